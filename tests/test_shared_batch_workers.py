"""Cross-job batching (issue 15) across worker processes: two workers claiming from the same queues never run a job
twice, and a worker killed in the middle of a shared batch leaves none of its jobs `running`.

Real processes: uvicorn, worker subprocesses, a private redis-server, SIGKILL.
"""

from __future__ import annotations

import signal
import time

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from fgs_common.telemetry import counter_field, counter_key, histogram_key
from support.live_calls import JobState, wait_for
from support.stack import start_stack

TINY = {"prompt": "a digit", "class_index": 1, "num_images": 1, "steps": 1, "guidance_every": 1}


def wait_batches(client, batch_ids: list[str], state: str, jobs: int, timeout: float) -> None:
    """Until the batches count `jobs` jobs in `state` (the batch view reads the records, nothing reconciles)."""
    deadline = time.time() + timeout
    while True:
        views = [client.get(f"/v1/batches/{b}").json() for b in batch_ids]
        if sum(v["counts"][state] for v in views) == jobs:
            return
        assert time.time() < deadline, views
        time.sleep(0.3)


def test_two_workers_claiming_200_small_jobs_run_each_once(live_stack):
    """On the session's stack (2 workers): counters are read before and after, as other tests share its prefix."""
    stack = live_stack
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    prefix = stack.prefix

    def counters() -> dict[str, float]:
        """Claims (entries into running) and image writes per tenant, and sampler calls, so far."""
        values = {"calls": float(records.hget(histogram_key(prefix, "batch_size"), "count") or 0)}
        for tenant in ("alpha", "beta"):
            claims = {"tenant": tenant, "criterion": "none", "status": "running"}
            values[f"claims {tenant}"] = float(records.hget(counter_key(prefix), counter_field("jobs", claims)) or 0)
            written = counter_field("images_generated", {"tenant": tenant})
            values[f"images {tenant}"] = float(records.hget(counter_key(prefix), written) or 0)
        return values

    before = counters()
    batches, job_ids = [], []
    for tenant in ("alpha", "beta"):
        with stack.client(tenant) as client:
            response = client.post("/v1/batches", json={"jobs": [dict(TINY, seed=k) for k in range(100)]})
            assert response.status_code == 202, response.text
            batches.append((tenant, response.json()["batch_id"]))
            job_ids += response.json()["job_ids"]
    for tenant, batch_id in batches:
        with stack.client(tenant) as client:
            wait_batches(client, [batch_id], "finished", 100, timeout=300)

    done = {name: value - before[name] for name, value in counters().items()}
    for tenant in ("alpha", "beta"):
        # every claim (queued -> running) counts once: 100 claims means no job was claimed twice
        assert done[f"claims {tenant}"] == 100, done
        assert done[f"images {tenant}"] == 100, done  # one image write per job
    workers = set()
    rq = redis.Redis.from_url(stack.redis_url)
    for job_id in job_ids:
        record = records.hgetall(f"{prefix}:job:{job_id}")
        assert record["state"] == "finished" and record["images_done"] == "1", record
        workers.add(record["worker"])
        # RQ ran it once: one successful execution, and it is finished there too
        rq_job = Job.fetch(job_id, connection=rq, serializer=JSONSerializer)
        assert rq_job.get_status() == "finished" and len(rq_job.results()) == 1, job_id
    assert len(workers) == 2  # both workers claimed
    assert done["calls"] < 200 / 2, f"{done['calls']} sampler calls for 200 one-image jobs: few were shared"


def test_a_worker_killed_mid_shared_batch_leaves_every_job_to_the_reconciler(redis_server, tiny_model_dir, tmp_path):
    env = {"FGS_ABANDONED_AFTER_S": "3", "FGS_JOB_RETRIES": "0"}
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=1, extra_env=env)
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        with stack.client("alpha") as client:
            jobs = [dict(TINY, seed=k, steps=300, guidance_every=5) for k in range(3)]
            response = client.post("/v1/batches", json={"jobs": jobs})
            assert response.status_code == 202, response.text
            batch_id, job_ids = response.json()["batch_id"], response.json()["job_ids"]
            for job_id in job_ids:  # one shared batch: all three running at once, on the one worker
                wait_for(client, job_id, lambda j: j.state is JobState.running and j.progress.step >= 2, timeout=120)
            victim = stack.workers[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            stack.spawn_worker()  # its maintenance sweeps the abandoned executions, then reconciles

            wait_batches(client, [batch_id], "failed", 3, timeout=90)
            for job_id in job_ids:
                record = records.hgetall(f"{stack.prefix}:job:{job_id}")
                assert record["state"] == "failed" and '"worker_failed"' in record["error"], record
            assert int(records.get(f"{stack.prefix}:tenant:alpha:queued_images") or 0) == 0
    finally:
        stack.close()
