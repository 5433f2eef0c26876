"""Fencing (issue 10, defect 6): a worker paused (SIGSTOP) past the abandon time loses its job to another worker;
resumed (SIGCONT), it can no longer write progress or results, nor change the finished record.

Real processes: uvicorn, two worker subprocesses, a private redis-server, real signals.
"""

from __future__ import annotations

import signal
import time

import redis
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from fgs_common.telemetry import counter_field, counter_key
from support.live_calls import JobState, generate, wait_final, wait_for
from support.stack import start_stack


def stop_until_taken_over(stack, records, record_key: str):
    """SIGSTOP the worker running the job until the other one has taken it over (once the stopped one's heartbeats
    are older than FGS_ABANDONED_AFTER_S) and sampled a step, then SIGCONT it; (its name, its process)."""
    first = records.hget(record_key, "worker")
    zombie = stack.workers[int(first.split("-")[0][1:])]
    zombie.send_signal(signal.SIGSTOP)
    try:
        deadline = time.time() + 90
        while records.hget(record_key, "worker") == first or int(records.hget(record_key, "step") or 0) < 1:
            assert time.time() < deadline, "no worker took the stopped worker's job over"
            time.sleep(0.1)
    finally:
        zombie.send_signal(signal.SIGCONT)
    return first, zombie


def test_a_stopped_and_resumed_worker_cannot_write_to_the_job_it_lost(redis_server, tiny_model_dir, tmp_path):
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=2, extra_env={"FGS_ABANDONED_AFTER_S": "3"})
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        with stack.client("alpha") as client:
            job_id = generate(client, num_images=4, steps=60, guidance_every=5)
            wait_for(client, job_id, lambda j: j.state is JobState.running and j.progress.step >= 2, timeout=120)
            record_key = f"{stack.prefix}:job:{job_id}"
            _, zombie = stop_until_taken_over(stack, records, record_key)
            taker = records.hget(record_key, "worker")

            finished = wait_final(client, job_id, timeout=240)
            assert finished.state is JobState.finished, finished
            assert finished.progress.images_done == 4 and len(finished.results) == 4
            settled = records.hgetall(record_key)
            time.sleep(3)  # the zombie had its chance to write
            assert records.hgetall(record_key) == settled
            assert settled["worker"] == taker
            made = counter_field("images_generated", {"tenant": "alpha"})
            images_made = records.hget(counter_key(stack.prefix), made)
            assert float(images_made) == 4, f"{images_made} images made for a 4-image job"
            # the resumed worker dropped the lost job and serves again
            assert zombie.poll() is None
            again = generate(client, steps=2, guidance_every=1)
            assert wait_final(client, again, timeout=120).state is JobState.finished
    finally:
        stack.close()


def test_a_job_whose_new_owner_is_killed_after_the_old_one_resumed_is_retried_and_finishes(
    redis_server, tiny_model_dir, tmp_path
):
    """The 30-minute soak's stuck job: the resumed worker ended the RQ job of the job it had lost, so when the
    worker that took it over was killed, RQ's abandon sweep skipped it (not `started`) and its record stayed
    `running` forever. Now the resumed worker leaves the RQ job to its new owner; that owner killed, the job is
    retried (here by the resumed worker, the only one left) and finishes."""
    env = {"FGS_ABANDONED_AFTER_S": "3", "FGS_JOB_RETRIES": "3"}  # one retry for each abandon, one to spare
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=2, extra_env=env)
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    rq_redis = redis.Redis.from_url(stack.redis_url)
    try:
        with stack.client("alpha") as client:
            job_id = generate(client, num_images=4, steps=400, guidance_every=5)
            wait_for(client, job_id, lambda j: j.state is JobState.running and j.progress.step >= 2, timeout=120)
            record_key = f"{stack.prefix}:job:{job_id}"
            first, zombie = stop_until_taken_over(stack, records, record_key)
            taker_name = records.hget(record_key, "worker")
            taker = stack.workers[int(taker_name.split("-")[0][1:])]

            # the resumed worker drops the job it lost and goes idle, while the taker still samples
            rq_worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + first, connection=rq_redis)
            deadline = time.time() + 60
            while rq_worker.get_state() != "idle":
                assert time.time() < deadline, "the resumed worker did not let go of the job it lost"
                time.sleep(0.1)
                rq_worker.refresh()
            assert records.hget(record_key, "state") == "running" and records.hget(record_key, "worker") == taker_name
            rq_job = Job.fetch(job_id, connection=rq_redis, serializer=JSONSerializer)
            assert rq_job.get_status() == "started", "the resumed worker ended the RQ job of a job it lost"

            taker.send_signal(signal.SIGKILL)
            taker.wait(timeout=30)
            finished = wait_final(client, job_id, timeout=240)
            assert finished.state is JobState.finished, finished.error
            assert finished.progress.images_done == 4 and len(finished.results) == 4
            assert records.hget(record_key, "worker") == first
    finally:
        stack.close()
