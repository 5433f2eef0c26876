"""Stale state (issue 10, defect 6): a job RQ gives up on (its worker killed, no retries left) is moved to `failed`
in its record, the batch view, the counters and the tenant's cap by the workers' periodic reconciler, without
anyone asking for that job; so is every job of a shared batch (issue 15). Real processes: uvicorn, workers, a
private redis-server, SIGKILL.
"""

from __future__ import annotations

import signal
import time

import redis

from support.live_calls import JobState, wait_for
from support.stack import start_stack


def stack_that_gives_up_fast(redis_server, tiny_model_dir, tmp_path, workers: int):
    """A stack whose jobs are abandoned after 3 s without heartbeats and never retried."""
    env = {"FGS_ABANDONED_AFTER_S": "3", "FGS_JOB_RETRIES": "0"}
    return start_stack(redis_server, tiny_model_dir, tmp_path, workers=workers, extra_env=env)


def test_a_job_rq_gave_up_on_is_failed_in_the_batch_view_and_the_counters(redis_server, tiny_model_dir, tmp_path):
    stack = stack_that_gives_up_fast(redis_server, tiny_model_dir, tmp_path, workers=2)
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


def test_a_job_taken_by_a_worker_that_died_before_starting_it_is_put_back_and_runs(
    redis_server, tiny_model_dir, tmp_path
):
    """The 30-minute soak lost a job that way: a worker took it off its queue and was SIGKILLed before RQ
    registered the execution. Here the taking is done by the workers' own script (fgs_common.rq_adapter.TAKE_JOB_LUA),
    leaving exactly what such a worker leaves; then a worker starts, and the job must run without a retry."""
    from rq import Queue

    from fgs_common.rq_adapter import TAKE_JOB_LUA

    stack = stack_that_gives_up_fast(redis_server, tiny_model_dir, tmp_path, workers=0)
    rq_redis = redis.Redis.from_url(stack.redis_url)
    try:
        with stack.client("alpha") as client:
            body = {"prompt": "a digit", "class_index": 1, "num_images": 1, "steps": 2, "guidance_every": 1}
            job_id = client.post("/v1/generate", json=body).json()["job_id"]
            queue = Queue(f"{stack.prefix}:alpha", connection=rq_redis)
            taken = rq_redis.register_script(TAKE_JOB_LUA)(keys=[queue.key, queue.intermediate_queue_key])
            assert taken[1].decode() == job_id and rq_redis.llen(queue.key) == 0  # in hand, nowhere else

            stack.spawn_worker()
            done = wait_for(client, job_id, lambda j: j.state.is_terminal, timeout=90)
            assert done.state is JobState.finished, done.error
            assert rq_redis.llen(queue.intermediate_queue_key) == 0
    finally:
        stack.close()


def test_a_worker_killed_mid_shared_batch_leaves_every_job_to_the_reconciler(redis_server, tiny_model_dir, tmp_path):
    """Cross-job batching (issue 15): each companion of the killed worker's shared batch is recovered too."""
    stack = stack_that_gives_up_fast(redis_server, tiny_model_dir, tmp_path, workers=1)
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        with stack.client("alpha") as client:
            jobs = [dict(prompt="a digit", class_index=1, seed=k, steps=300, guidance_every=5) for k in range(3)]
            response = client.post("/v1/batches", json={"jobs": jobs})
            assert response.status_code == 202, response.text
            batch_id, job_ids = response.json()["batch_id"], response.json()["job_ids"]
            for job_id in job_ids:  # one shared batch: all three running at once, on the one worker
                wait_for(client, job_id, lambda j: j.state is JobState.running and j.progress.step >= 2, timeout=120)
            victim = stack.workers[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            stack.spawn_worker()  # its maintenance sweeps the abandoned executions, then reconciles

            deadline = time.time() + 90
            while client.get(f"/v1/batches/{batch_id}").json()["counts"]["failed"] != 3:
                assert time.time() < deadline, client.get(f"/v1/batches/{batch_id}").json()
                time.sleep(0.3)
            for job_id in job_ids:
                record = records.hgetall(f"{stack.prefix}:job:{job_id}")
                assert record["state"] == "failed" and '"worker_failed"' in record["error"], record
            assert int(records.get(f"{stack.prefix}:tenant:alpha:queued_images") or 0) == 0
    finally:
        stack.close()
