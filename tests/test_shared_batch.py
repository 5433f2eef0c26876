"""Cross-job batching (issue 15) in one worker: a small job's sampler call is filled with queued jobs of any tenant,
each job keeping its own record, fence, cancel, retry and pixels.

Real parts throughout: the API app in process (TestClient) on a private redis-server, the tiny model, and the real
RQ worker class running jobs in this process, so RQ's own execution, success and retry paths are what run. The
faults are torch forward pre-hooks on the real UNet that, at a chosen call, raise as a failing model would, call
the real cancel route, or take a job over as another worker's claim does.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq.job import Job
from rq.serializers import JSONSerializer

from fgs_common.job_records import JobRecords
from fgs_common.telemetry import counter_field, counter_key
from fgs_common.wire import JobPublic, JobState
from support.stack import TENANT_KEYS, keys_document
from support.worker_loop import in_process_settings, run_next_job, start_worker

# Small and quick: 32 px images, 4 steps; a step of 8 images takes well under a second here.
JOB = {"prompt": "a handwritten digit", "class_index": 1, "num_images": 1, "steps": 4, "guidance_every": 2}


@pytest.fixture
def setup(redis_server, tiny_model_dir, tmp_path):
    """(API clients by tenant, in-process worker, settings) on a prefix of this test's own."""
    from fgs_service.app import create_app

    tenants = dict(api_keys=keys_document(), api_keys_file=None, dev_api_key=None)
    settings = in_process_settings(redis_server, tiny_model_dir, tmp_path, "shared", max_batch_images=8, **tenants)
    worker = start_worker(settings, "shared")
    with TestClient(create_app(settings)) as client:
        yield {tenant: AsTenant(client, key) for tenant, key in TENANT_KEYS.items()}, worker, settings
    worker.register_death()


class AsTenant:
    """The app's one TestClient (one event loop, one Redis pool), with a tenant's key on every call."""

    def __init__(self, client: TestClient, key: str):
        self.client, self.headers = client, {"Authorization": f"Bearer {key}"}

    def get(self, url: str, **kwargs):
        return self.client.get(url, headers=self.headers, **kwargs)

    def post(self, url: str, **kwargs):
        return self.client.post(url, headers=self.headers, **kwargs)

    def delete(self, url: str, **kwargs):
        return self.client.delete(url, headers=self.headers, **kwargs)


def submit_batch(client, jobs: list[dict]) -> list[str]:
    """All `jobs` queued in one step (POST /v1/batches), so the first one a worker takes finds the others."""
    response = client.post("/v1/batches", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    return response.json()["job_ids"]


def job(client, job_id: str) -> JobPublic:
    return JobPublic.model_validate(client.get(f"/v1/jobs/{job_id}").json())


def pixels(client, image_id: str) -> np.ndarray:
    response = client.get(f"/v1/images/{image_id}")
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def count(worker, settings, name: str, **labels) -> float:
    return float(worker.runtime.redis.hget(counter_key(settings.redis_prefix), counter_field(name, labels)) or 0)


def assert_retrying(client, worker, settings, job_id: str, message: str) -> None:
    """The job failed once with `message`: back to queued in its record, scheduled by RQ with one retry spent."""
    failed = job(client, job_id)
    assert failed.state is JobState.queued and failed.error.code == "retrying", failed
    assert message in failed.error.message
    rq_job = Job.fetch(job_id, connection=worker.connection, serializer=JSONSerializer)
    assert rq_job.get_status() == "scheduled" and rq_job.retries_left == settings.job_retries - 1


def on_unet_call(worker, at: int, action):
    """Run `action()` before the UNet's `at`-th forward (1-based) of this worker; returns the hook's handle."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == at:
            action()

    return worker.runtime.sampler.pipeline.unet.register_forward_pre_hook(hook)


def test_a_job_in_a_shared_batch_has_its_pixels_alone_and_a_later_tenant_is_not_starved(setup):
    clients, worker, settings = setup
    alpha, beta = clients["alpha"], clients["beta"]
    mine = dict(JOB, prompt="a photo of digit seven", class_index=7, seed=41, gamma=3.0)
    (alone_id,) = submit_batch(beta, [mine])
    run_next_job(worker)  # a lone job starts at once, at batch 1
    alone = job(beta, alone_id)
    assert alone.state is JobState.finished and len(alone.results) == 1

    # alpha queues 10 small jobs of other prompts, seeds and γ; then beta, later, the same job as before
    others = [dict(JOB, prompt=f"digit {k}", class_index=k % 10, seed=100 + k, gamma=1.5 + k) for k in range(10)]
    alpha_ids = submit_batch(alpha, others)
    (shared_id,) = submit_batch(beta, [mine])
    run_next_job(worker)  # one job taken: alpha's first, filled to 8 images in turn (beta, alpha, alpha, ...)

    shared = job(beta, shared_id)
    assert shared.state is JobState.finished, shared  # beta's later job rode in alpha's first batch
    states = [job(alpha, i).state for i in alpha_ids]
    assert states == [JobState.finished] * 7 + [JobState.queued] * 3, states  # 7 + beta's 1 = 8 images
    records = JobRecords(worker.runtime.redis, settings.redis_prefix)
    ran = [records.read(i) for i in [*alpha_ids[:7], shared_id]]
    assert {r.worker for r in ran} == {"shared"}
    # one sampler call: every job had started before any finished
    assert max(r.started_at for r in ran) < min(r.finished_at for r in ran)
    assert len({r.owner for r in ran}) == 8  # a token of its own each
    for before, after in zip(alone.results, shared.results, strict=True):
        assert after.seed == before.seed
        # the same seeds give the same pixels (within a rounding of the float image, as for in-job batches)
        assert np.abs(pixels(beta, after.image_id) - pixels(beta, before.image_id)).max() <= 1
    assert worker.executions == {}  # every companion's RQ execution ended
    for job_id in [*alpha_ids[:7], shared_id]:
        assert Job.fetch(job_id, connection=worker.connection, serializer=JSONSerializer).get_status() == "finished"


def test_canceling_one_job_of_a_shared_batch_removes_its_images_and_the_others_finish(setup):
    clients, worker, settings = setup
    alpha = clients["alpha"]
    first, second, third = submit_batch(alpha, [dict(JOB, seed=k) for k in range(3)])
    # the API's cancel route, called between two steps of the shared batch
    handle = on_unet_call(worker, 3, lambda: alpha.delete(f"/v1/jobs/{second}").raise_for_status())
    try:
        run_next_job(worker)
    finally:
        handle.remove()
    canceled = job(alpha, second)
    assert canceled.state is JobState.canceled and canceled.results == [], canceled
    for job_id in (first, third):
        done = job(alpha, job_id)
        assert done.state is JobState.finished and len(done.results) == 1, done
    assert count(worker, settings, "images_generated", tenant="alpha") == 2
    assert not worker.runtime.redis.exists(worker.runtime.keys.cancel(second))


def test_a_failed_shared_batch_retries_each_job_on_its_own(setup):
    clients, worker, settings = setup
    alpha, beta = clients["alpha"], clients["beta"]
    ids = submit_batch(alpha, [dict(JOB, seed=k) for k in range(2)]) + submit_batch(beta, [dict(JOB, seed=9)])

    def fail():
        raise ValueError("failure inside the UNet forward")

    # every call fails while the hook is on: the shared call, then each job's call alone
    handle = worker.runtime.sampler.pipeline.unet.register_forward_pre_hook(lambda module, args: fail())
    try:
        run_next_job(worker)
    finally:
        handle.remove()
    for job_id, client in zip(ids, (alpha, alpha, beta), strict=True):
        assert_retrying(client, worker, settings, job_id, "ValueError: failure inside the UNet")
    assert worker.executions == {}

    for _ in range(3):  # each retry comes back after its own backoff; the first taken claims the others again
        if all(job(c, i).state is JobState.finished for i, c in zip(ids, (alpha, alpha, beta), strict=True)):
            break
        run_next_job(worker)
    for job_id, client in zip(ids, (alpha, alpha, beta), strict=True):
        done = job(client, job_id)
        assert done.state is JobState.finished and len(done.results) == 1, done
    assert count(worker, settings, "images_generated", tenant="alpha") == 2
    assert count(worker, settings, "images_generated", tenant="beta") == 1


@pytest.mark.parametrize("at_fault_is", ["a companion", "the leader"])
def test_a_job_that_breaks_a_shared_call_is_charged_alone_and_its_batchmates_finish(setup, at_fault_is):
    """A 3-image job breaks any call of 3 images or more (as a classifier that fails on a batch size would); two
    1-image jobs shared that call. Only the 3-image job spends a retry, whether the worker took it first (the
    leader, RQ's own job) or claimed it beside another (a companion)."""
    clients, worker, settings = setup
    alpha = clients["alpha"]
    small, big = [dict(JOB, seed=k) for k in range(2)], dict(JOB, seed=9, num_images=3)
    if at_fault_is == "the leader":
        at_fault, *innocent = submit_batch(alpha, [big, *small])
    else:
        *innocent, at_fault = submit_batch(alpha, [*small, big])
    rows = []

    def fail_from_three_images(module, args):
        rows.append(args[0].shape[0])
        if args[0].shape[0] >= 6:  # two UNet rows per image (classifier-free guidance): 3 images or more
            raise ValueError("this call holds 3 images or more")

    handle = worker.runtime.sampler.pipeline.unet.register_forward_pre_hook(fail_from_three_images)
    try:
        run_next_job(worker)
    finally:
        handle.remove()
    assert rows[0] == 10  # the shared call: 1 + 1 + 3 images, two rows each
    for job_id in innocent:
        done = job(alpha, job_id)
        assert done.state is JobState.finished and len(done.results) == 1 and done.error is None, done
        rq_job = Job.fetch(job_id, connection=worker.connection, serializer=JSONSerializer)
        assert rq_job.get_status() == "finished"
    assert_retrying(alpha, worker, settings, at_fault, "this call holds 3 images or more")
    assert worker.executions == {}
    assert count(worker, settings, "images_generated", tenant="alpha") == 2

    for _ in range(3):  # without the fault, the retry finishes
        if job(alpha, at_fault).state is JobState.finished:
            break
        run_next_job(worker)
    done = job(alpha, at_fault)
    assert done.state is JobState.finished and len(done.results) == 3, done


def run_taken_over_at_second_unet_call(worker, records: JobRecords, job_id: str) -> None:
    """Run the next batch while, at its 2nd UNet call, job `job_id` is taken over as another worker's claim of an
    abandoned job does: a new owner token, written from the current owner only."""

    def take_over():
        owner = records.read(job_id).owner
        assert records.transition(
            job_id, JobState.running, (JobState.running,), expect_owner=owner, owner="other:token", worker="other"
        )

    handle = on_unet_call(worker, 2, take_over)
    try:
        run_next_job(worker)
    finally:
        handle.remove()


def test_a_companion_taken_over_by_another_worker_is_not_written_to(setup):
    clients, worker, settings = setup
    alpha = clients["alpha"]
    first, second, third = submit_batch(alpha, [dict(JOB, seed=k) for k in range(3)])
    records = JobRecords(worker.runtime.redis, settings.redis_prefix)
    run_taken_over_at_second_unet_call(worker, records, second)
    lost = records.read(second)
    assert (lost.state, lost.owner, lost.worker) == (JobState.running, "other:token", "other")
    assert lost.images_done == 0 and lost.results == ()  # no progress, image or end written after
    for job_id in (first, third):
        done = job(alpha, job_id)
        assert done.state is JobState.finished and len(done.results) == 1, done
    assert count(worker, settings, "images_generated", tenant="alpha") == 2


def test_the_claim_takes_one_job_per_tenant_in_turn_so_a_big_backlog_starves_no_one():
    from fgs_worker.shared_batch import pick_round_robin

    # after the leader's tenant: beta (one job, queued after alpha's 2,000), gamma (a 3-image job, then another
    # batch key), then alpha itself (its backlog, as much as a claim looks at)
    heads = [
        [("b1", "k", 1)],
        [("g1", "k", 3), ("g2", "other", 1), ("g3", "k", 1)],
        [(f"a{i}", "k", 1) for i in range(7)],
    ]
    assert pick_round_robin(heads, "k", 7) == [(0, "b1"), (1, "g1"), (2, "a0"), (1, "g3"), (2, "a1")]
    assert pick_round_robin(heads, "k", 1) == [(0, "b1")]
    assert pick_round_robin(heads, "none", 7) == []


@pytest.mark.parametrize("lost_is", ["leader", "companion"])
def test_a_job_lost_to_another_worker_is_left_to_it_in_rq(setup, lost_is):
    """The 30-minute soak: a worker that lost a job (paused past the abandon time, another worker took the job over)
    ended that job's RQ job as a success when its batch ended; RQ then never retried it once its new owner was
    killed, and the record stayed `running` forever. The losing worker must end only its own execution: RQ keeps
    the job started (its new owner's), and no entry of the stale execution is left for the abandon sweep to retry."""
    clients, worker, settings = setup
    alpha = clients["alpha"]
    leader, companion, other = submit_batch(alpha, [dict(JOB, seed=k) for k in range(3)])
    lost_id = leader if lost_is == "leader" else companion
    records = JobRecords(worker.runtime.redis, settings.redis_prefix)
    run_taken_over_at_second_unet_call(worker, records, lost_id)
    lost_rq_job = Job.fetch(lost_id, connection=worker.connection, serializer=JSONSerializer)
    assert lost_rq_job.get_status() == "started", "the losing worker ended the RQ job of a job it no longer owns"
    assert lost_id not in lost_rq_job.started_job_registry.get_job_ids(cleanup=False)
    assert worker.executions == {}
    kept = job(alpha, other)
    assert kept.state is JobState.finished and len(kept.results) == 1, kept
    kept_rq_job = Job.fetch(other, connection=worker.connection, serializer=JSONSerializer)
    assert kept_rq_job.get_status() == "finished"
