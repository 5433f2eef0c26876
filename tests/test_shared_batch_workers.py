"""Cross-job batching (issue 15) across worker processes: two workers claiming from the same queues never run a job
twice (a worker killed in the middle of a shared batch: tests/test_faults_reconciler.py).

Real processes: uvicorn, worker subprocesses, a private redis-server.
"""

from __future__ import annotations

import time

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from fgs_common.telemetry import counter_field, counter_key, histogram_key

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
