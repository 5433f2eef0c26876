"""A SIGKILLed enqueue leaks no quota and no Idempotency-Key (issue 10, defect 5).

The API is killed at several points while it queues a large batch under an Idempotency-Key. Afterwards (and once
the reservations' short TTL has passed) the tenant's queued-image count equals the images of the jobs that are
really queued, and the key is either gone or names a batch whose every job exists; a new API on the same prefix
accepts the same key. Real uvicorn, real Redis, real SIGKILL.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import redis

from fgs_common.loopback import free_port
from fgs_lab.live_stack import spawn_api
from support.stack import start_stack

RESERVATION_TTL_S = 2
JOBS = 3000


def batch_body(jobs: int) -> dict:
    return {
        "jobs": [
            {"prompt": "a digit", "class_index": i % 10, "num_images": 1 + i % 3, "steps": 2, "guidance_every": 1}
            for i in range(jobs)
        ]
    }


def post_in_background(stack, body: dict, key: str) -> threading.Thread:
    def post() -> None:
        try:
            with stack.client("alpha") as client:
                client.post("/v1/batches", json=body, headers={"Idempotency-Key": key}, timeout=120)
        except httpx.HTTPError:
            pass  # the API died under it: that is the point

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def restart_api(stack) -> None:
    """A new uvicorn on the stack's Redis prefix (and a new port), in place of the killed one."""
    port = free_port()
    stack.api = spawn_api(stack.env, port, stack.log_dir / f"api-{port}.log")
    stack.base_url = f"http://127.0.0.1:{port}"
    stack.wait_ready(0)


def audit(client: redis.Redis, prefix: str, tenant: str) -> tuple[int, int, list[str]]:
    """(queued-image counter, images of queued jobs, idempotency keys left) for the tenant."""
    counter = int(client.get(f"{prefix}:tenant:{tenant}:queued_images") or 0)
    queued_images = 0
    for key in client.scan_iter(match=f"{prefix}:job:*", count=1000):
        state, images = client.hmget(key, "state", "images_total")
        if state == "queued":
            queued_images += int(images)
    return counter, queued_images, list(client.scan_iter(match=f"{prefix}:idem:{tenant}:*"))


def test_an_api_killed_mid_enqueue_leaks_no_quota_and_no_key(redis_server, tiny_model_dir, tmp_path):
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    body = batch_body(JOBS)
    # points from "body still arriving" to "MULTI being built or sent"; the last one usually completes
    for trial, kill_after_s in enumerate((0.3, 0.8, 1.4, 2.2)):
        env = {"FGS_ENQUEUE_RESERVATION_TTL_S": str(RESERVATION_TTL_S)}
        stack = start_stack(redis_server, tiny_model_dir, tmp_path / f"t{trial}", workers=0, extra_env=env)
        try:
            key = f"kill-{trial}"
            thread = post_in_background(stack, body, key)
            time.sleep(kill_after_s)
            stack.api.send_signal(signal.SIGKILL)
            stack.api.wait(timeout=30)
            thread.join(timeout=60)
            time.sleep(RESERVATION_TTL_S + 0.5)

            counter, queued_images, keys = audit(client, stack.prefix, "alpha")
            assert counter == queued_images, f"trial {trial}: counter {counter} but {queued_images} images queued"
            for idem in keys:
                value = client.get(idem)
                assert not value.startswith("pending:"), f"trial {trial}: key {idem} still pending after its TTL"
                batch = client.hget(f"{stack.prefix}:batch:{value}", "job_ids")
                assert batch is not None, f"trial {trial}: key points at batch {value}, which does not exist"
                assert all(client.exists(f"{stack.prefix}:job:{j}") for j in batch.split(","))
        finally:
            stack.close()


def test_the_same_key_after_a_killed_enqueue_is_accepted_once(redis_server, tiny_model_dir, tmp_path):
    """After a kill, the key's reservation expires and a retry with the same key queues the batch exactly once."""
    env = {"FGS_ENQUEUE_RESERVATION_TTL_S": str(RESERVATION_TTL_S)}
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=0, extra_env=env)
    body = batch_body(JOBS)
    try:
        thread = post_in_background(stack, body, "retry-after-kill")
        time.sleep(0.8)
        stack.api.send_signal(signal.SIGKILL)
        stack.api.wait(timeout=30)
        thread.join(timeout=60)
        time.sleep(RESERVATION_TTL_S + 0.5)
        restart_api(stack)
        with stack.client("alpha") as client:
            first = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "retry-after-kill"}, timeout=120)
            second = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "retry-after-kill"}, timeout=120)
        assert first.status_code == second.status_code == 202, (first.text[:300], second.text[:300])
        assert first.json()["batch_id"] == second.json()["batch_id"]
        records = redis.Redis.from_url(redis_server, decode_responses=True)
        counter, queued_images, _ = audit(records, stack.prefix, "alpha")
        assert counter == queued_images
    finally:
        stack.close()
