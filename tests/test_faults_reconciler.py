"""Stale state (issue 10, defect 6): a job RQ gives up on (its worker killed, no retries left) is moved to `failed`
in its record, the batch view, the counters and the tenant's cap by the workers' periodic reconciler, without
anyone asking for that job. Real processes: uvicorn, two workers, a private redis-server, SIGKILL.
"""

from __future__ import annotations

import signal
import time

import redis

from support.live_calls import JobState, wait_for
from support.stack import start_stack


def test_a_job_rq_gave_up_on_is_failed_in_the_batch_view_and_the_counters(redis_server, tiny_model_dir, tmp_path):
    env = {"FGS_ABANDONED_AFTER_S": "3", "FGS_JOB_RETRIES": "0"}
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=2, extra_env=env)
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        with stack.client("alpha") as client:
            job = {"prompt": "a digit", "class_index": 1, "num_images": 2, "steps": 200, "guidance_every": 5}
            batch = client.post("/v1/batches", json={"jobs": [job]})
            assert batch.status_code == 202, batch.text
            batch_id, (job_id,) = batch.json()["batch_id"], batch.json()["job_ids"]
            wait_for(client, job_id, lambda j: j.state is JobState.running and j.progress.step >= 2, timeout=120)
            worker = records.hget(f"{stack.prefix}:job:{job_id}", "worker")
            victim = stack.workers[int(worker.split("-")[0][1:])]
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)

            # only the batch view and Redis are read: no GET of the job itself (which reconciles on read)
            deadline = time.time() + 60
            while client.get(f"/v1/batches/{batch_id}").json()["counts"]["failed"] != 1:
                assert time.time() < deadline, client.get(f"/v1/batches/{batch_id}").json()
                time.sleep(0.3)
            assert int(records.get(f"{stack.prefix}:tenant:alpha:queued_images") or 0) == 0
            listed = client.get("/v1/jobs", params={"state": "failed"}).json()["jobs"]
            assert [j["job_id"] for j in listed] == [job_id]
            assert listed[0]["error"]["code"] == "worker_failed"
    finally:
        stack.close()
