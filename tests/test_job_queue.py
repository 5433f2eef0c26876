"""fgs_service.job_queue.JobQueue on a real Redis: enqueue, idempotency, the queued-image cap and its rollback,
cancel, and the reads the routers make."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from fgs_common.telemetry import worker_gauge_key
from fgs_common.wire import GenerateRequest, JobState
from fgs_service.auth import Tenant
from fgs_service.job_queue import JobQueue, QueueFull
from support.service_settings import service_settings

ALPHA = Tenant("alpha", max_queued_images=10)
BETA = Tenant("beta", max_queued_images=10)


def request(num_images: int = 1, **fields) -> GenerateRequest:
    return GenerateRequest(prompt="a digit", class_index=1, num_images=num_images, steps=2, guidance_every=1, **fields)


class QueueHarness:
    """A JobQueue with its three clients, and one event loop for its async enqueue."""

    def __init__(self, redis_url: str, tmp_path):
        self.settings = service_settings(redis_url, tmp_path / "data")
        self.runner = asyncio.Runner()
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.rq_redis = redis.Redis.from_url(redis_url)
        self.async_redis = self.runner.run(self._async_client(redis_url))
        self.queue = JobQueue(self.redis, self.rq_redis, self.async_redis, self.settings)

    @staticmethod
    async def _async_client(url: str):
        return redis.asyncio.Redis.from_url(url, decode_responses=True)

    def enqueue(self, tenant: Tenant, requests: list[GenerateRequest], **kwargs):
        return self.runner.run(self.queue.enqueue(tenant, requests, **kwargs))

    def queued_images(self, tenant: Tenant) -> int:
        return int(self.redis.get(self.queue.keys.queued_images(tenant.name)) or 0)

    def rq_length(self, tenant: Tenant) -> int:
        return self.rq_redis.llen(self.queue.queue(tenant.name).key)

    def close(self) -> None:
        self.runner.run(self.async_redis.aclose())
        self.runner.close()
        self.redis.close()
        self.rq_redis.close()


@pytest.fixture
def harness(redis_server, tmp_path):
    h = QueueHarness(redis_server, tmp_path)
    yield h
    h.close()


def test_enqueue_writes_record_rq_job_and_reservation_together(harness):
    enqueued = harness.enqueue(ALPHA, [request(3)])
    assert enqueued.replayed is False and len(enqueued.ids) == 1
    job_id = enqueued.ids[0]
    record = harness.queue.records.read(job_id)
    assert (record.tenant, record.state, record.images_total) == ("alpha", JobState.queued, 3)
    assert harness.queued_images(ALPHA) == 3
    assert harness.rq_length(ALPHA) == 1
    assert Job.exists(job_id, connection=harness.rq_redis)
    assert harness.queue.queue_depths() == {"alpha": 1}


def test_the_same_idempotency_key_returns_the_first_job(harness):
    first = harness.enqueue(ALPHA, [request(2)], idempotency_key="k1")
    again = harness.enqueue(ALPHA, [request(2)], idempotency_key="k1")
    assert again.replayed is True and again.ids == first.ids
    other_key = harness.enqueue(ALPHA, [request(2)], idempotency_key="k2")
    other_tenant = harness.enqueue(BETA, [request(2)], idempotency_key="k1")  # keys are per tenant
    assert other_key.ids != first.ids and other_tenant.ids != first.ids and not other_tenant.replayed
    assert harness.queued_images(ALPHA) == 4  # the replay reserved nothing
    assert harness.rq_length(ALPHA) == 2


def test_a_replayed_batch_returns_the_first_batch_and_its_jobs(harness):
    first = harness.enqueue(ALPHA, [request(1), request(2)], batch_id="b1", idempotency_key="plan")
    again = harness.enqueue(ALPHA, [request(1), request(2)], batch_id="b2", idempotency_key="plan")
    assert again.replayed is True and again.batch_id == "b1" and again.ids == []
    assert harness.queue.batch_job_ids(ALPHA, "b1") == first.ids
    assert harness.queue.batch_job_ids(BETA, "b1") is None
    assert harness.queue.batch_job_ids(ALPHA, "b2") is None
    # a single job and a batch under the same key are different requests
    single = harness.enqueue(ALPHA, [request(1)], idempotency_key="plan")
    assert single.replayed is False
    assert harness.queued_images(ALPHA) == 4


def test_a_request_over_the_cap_is_refused_and_rolled_back(harness):
    kept = harness.enqueue(ALPHA, [request(8)])
    with pytest.raises(QueueFull, match="tenant has 8 images queued; cap is 10, this request adds 3") as refused:
        harness.enqueue(ALPHA, [request(3)], idempotency_key="retry-me")
    assert refused.value.retry_after_s == 30
    assert harness.queued_images(ALPHA) == 8  # the reservation was given back
    assert harness.rq_length(ALPHA) == 1
    assert harness.redis.zcard(harness.queue.keys.tenant_jobs("alpha")) == 1
    # a whole batch over the cap leaves nothing either
    with pytest.raises(QueueFull):
        harness.enqueue(ALPHA, [request(1), request(2)], batch_id="too-big")
    assert harness.queued_images(ALPHA) == 8 and harness.queue.batch_job_ids(ALPHA, "too-big") is None
    # the refused request's Idempotency-Key was released: once there is room, the same key queues a new job
    assert harness.queue.cancel(ALPHA, kept.ids[0]) is True
    assert harness.queued_images(ALPHA) == 0
    retried = harness.enqueue(ALPHA, [request(3)], idempotency_key="retry-me")
    assert retried.replayed is False and harness.queued_images(ALPHA) == 3


def test_cancel_removes_a_queued_job_and_flags_a_running_one(harness):
    queued, running = harness.enqueue(ALPHA, [request(2), request(1)], batch_id="b").ids
    assert harness.queue.cancel(ALPHA, queued) is True
    assert harness.queue.records.read(queued).state is JobState.canceled
    assert not Job.exists(queued, connection=harness.rq_redis)
    assert harness.rq_length(ALPHA) == 1
    assert harness.queue.cancel(ALPHA, queued) is False  # already final
    assert harness.queue.records.transition(running, JobState.running, (JobState.queued,))
    assert harness.queue.cancel(ALPHA, running) is True
    assert harness.queue.records.read(running).state is JobState.running  # the worker stops it at its next step
    assert harness.redis.get(harness.queue.keys.cancel(running)) == "1"
    assert harness.queued_images(ALPHA) == 1


def test_job_is_the_owners_only(harness):
    (job_id,) = harness.enqueue(ALPHA, [request(1)]).ids
    job = harness.queue.job(ALPHA, job_id)
    assert job is not None and job.state is JobState.queued and job.progress.images_total == 1
    assert harness.queue.job(BETA, job_id) is None
    assert harness.queue.job(ALPHA, "no-such-job") is None


def test_list_jobs_pages_newest_first_and_filters_by_state(harness):
    ids = [harness.enqueue(ALPHA, [request(1, seed=i)]).ids[0] for i in range(4)]
    harness.enqueue(BETA, [request(1)])
    assert harness.queue.cancel(ALPHA, ids[1])
    listed = harness.queue.list_jobs(ALPHA, None, limit=10, offset=0)
    assert listed.count == 4 and [j.job_id for j in listed.jobs] == ids[::-1]
    page = harness.queue.list_jobs(ALPHA, None, limit=2, offset=1)
    assert [j.job_id for j in page.jobs] == [ids[2], ids[1]]
    canceled = harness.queue.list_jobs(ALPHA, JobState.canceled, limit=10, offset=0)
    assert [j.job_id for j in canceled.jobs] == [ids[1]] and canceled.count == 1


def test_batch_summary_counts_jobs_by_state(harness):
    enqueued = harness.enqueue(ALPHA, [request(2), request(3), request(1)], batch_id="plan-1")
    first, second, third = enqueued.ids
    records = harness.queue.records
    assert records.transition(first, JobState.running, (JobState.queued,))
    assert records.transition(first, JobState.finished, (JobState.running,), images_done=2)
    assert harness.queue.cancel(ALPHA, third)
    summary = harness.queue.batch_summary(ALPHA, "plan-1")
    assert summary.job_ids == [first, second, third]
    assert {s.value: n for s, n in summary.counts.items()} == {
        "queued": 1,
        "running": 0,
        "finished": 1,
        "failed": 0,
        "canceled": 1,
    }
    assert (summary.images_done, summary.images_total) == (2, 6)
    assert harness.queue.batch_summary(BETA, "plan-1") is None
    assert harness.queue.batch_summary(ALPHA, "no-such-batch") is None


def test_live_workers_are_those_with_a_heartbeat_key(harness):
    harness.queue.ping()
    assert harness.queue.live_worker_names() == []
    harness.redis.set(harness.queue.keys.worker_alive("w-b"), "1", ex=30)
    harness.redis.set(harness.queue.keys.worker_alive("w-a"), "1", ex=30)
    harness.redis.set("some-other-prefix:worker:w-c", "1", ex=30)
    assert harness.queue.live_worker_names() == ["w-a", "w-b"]


@pytest.mark.parametrize(("state", "rq_end"), [("running", "finished"), ("running", "gone"), ("queued", "gone")])
def test_an_active_job_rq_will_not_run_again_and_no_live_worker_holds_is_failed_as_worker_lost(harness, state, rq_end):
    """The 30-minute soak's stuck job, whatever ended its RQ job: read (GET, and the SSE stream, which reads
    through `JobQueue.job`), it is failed with `worker_lost` once neither RQ nor a live worker will end it."""
    (job_id,) = harness.enqueue(ALPHA, [request(num_images=2)]).ids
    alive = harness.queue.keys.worker_alive("w-gone")
    rq_job = Job.fetch(job_id, connection=harness.rq_redis, serializer=JSONSerializer)
    if state == "running":
        assert harness.queue.records.transition(
            job_id, JobState.running, (JobState.queued,), worker="w-gone", owner="w-gone:token"
        )
        rq_job.set_status(JobStatus.STARTED)
        harness.redis.set(alive, "1", ex=30)
        assert harness.queue.job(ALPHA, job_id).state is JobState.running  # RQ runs it
    else:
        assert harness.queue.job(ALPHA, job_id).state is JobState.queued  # RQ will run it
    if rq_end == "finished":
        rq_job.set_status(JobStatus.FINISHED)
    else:
        rq_job.delete()
    if state == "running":
        assert harness.queue.job(ALPHA, job_id).state is JobState.running  # its worker is alive: it may end it
        harness.redis.delete(alive)
    lost = harness.queue.job(ALPHA, job_id)
    assert lost.state is JobState.failed and lost.error.code == "worker_lost", lost
    assert "nothing will run it" in lost.error.message
    assert harness.queued_images(ALPHA) == 0


def test_a_job_rq_filed_failed_is_failed_with_rqs_error_whatever_its_worker(harness):
    (job_id,) = harness.enqueue(ALPHA, [request()]).ids
    assert harness.queue.records.transition(job_id, JobState.running, (JobState.queued,), worker="w-1", owner="t")
    harness.redis.set(harness.queue.keys.worker_alive("w-1"), "1", ex=30)
    rq_job = Job.fetch(job_id, connection=harness.rq_redis, serializer=JSONSerializer)
    rq_job.set_status(JobStatus.FAILED)
    failed = harness.queue.job(ALPHA, job_id)
    assert failed.state is JobState.failed and failed.error.code == "worker_failed", failed


def test_live_workers_name_the_job_each_runs(harness):
    """The operator view's workers: each live worker with its last beat and the running job its record names."""
    (job_id,) = harness.enqueue(ALPHA, [request()]).ids
    harness.enqueue(BETA, [request()])  # queued: no worker shows it
    assert harness.queue.records.transition(job_id, JobState.running, (JobState.queued,), worker="w-a", owner="t")
    started = harness.queue.queue(ALPHA.name).started_job_registry
    harness.rq_redis.zadd(started.key, {f"{job_id}:execution-1": 9e9})  # RQ's entry for a running execution
    for name in ("w-a", "w-b"):
        harness.redis.set(harness.queue.keys.worker_alive(name), "1", ex=30)
    harness.redis.hset(worker_gauge_key(harness.queue.keys.prefix, "w-a"), "last_heartbeat", 1.0e9)
    workers = {w.name: w for w in harness.queue.live_workers()}
    assert set(workers) == {"w-a", "w-b"}
    assert (workers["w-a"].job_id, workers["w-a"].job_tenant) == (job_id, "alpha")
    assert workers["w-a"].last_heartbeat.timestamp() == 1.0e9
    assert workers["w-b"].job_id is None and workers["w-b"].last_heartbeat is None
