"""A worker yields between the chunks of a large job when another tenant's job is queued (issue 19, item 5).

Real parts, as in test_shared_batch.py: the API app in process on a private redis-server, the tiny model and the
real RQ worker class running jobs in this process (RQ's own success and repeat paths run). Tenant beta's 1-image
job is queued from inside alpha's 64-image job (a pre-hook on the real UNet calls the real route), so it arrives
while a chunk is running.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fgs_common.telemetry import counter_field, counter_key
from fgs_common.wire import JobPublic, JobState
from support.stack import TENANT_KEYS, keys_document
from support.worker_loop import in_process_settings, run_next_job, start_worker

JOB = {"prompt": "a handwritten digit", "steps": 4, "guidance_every": 2}
LARGE = dict(JOB, class_index=1, num_images=64, seed=100)
SMALL = dict(JOB, class_index=2, num_images=1, seed=7)
CHUNK_TARGET_S = 2.0


@pytest.fixture
def setup(redis_server, tiny_model_dir, tmp_path):
    from fgs_service.app import create_app

    tenants = dict(api_keys=keys_document(), api_keys_file=None, dev_api_key=None)
    settings = in_process_settings(
        redis_server, tiny_model_dir, tmp_path, "preempt", max_batch_images=8, chunk_target_s=CHUNK_TARGET_S, **tenants
    )
    worker = start_worker(settings, "preempt")
    with TestClient(create_app(settings)) as client:
        headers = {tenant: {"Authorization": f"Bearer {key}"} for tenant, key in TENANT_KEYS.items()}
        yield client, headers, worker, settings
    worker.register_death()


def submit(client, headers, body) -> str:
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def job(client, headers, job_id) -> JobPublic:
    return JobPublic.model_validate(client.get(f"/v1/jobs/{job_id}", headers=headers).json())


def run_with_beta_arriving(client, headers, worker) -> tuple[str, list[float]]:
    """Run the next job (alpha's) while beta's 1-image job is queued before the UNet's 2nd forward, as the real
    route queues it; returns (beta's job id, the time of each UNet forward)."""
    queued, calls = {}, []

    def hook(module, args):
        calls.append(time.time())
        if len(calls) == 2:
            queued["job_id"] = submit(client, headers["beta"], SMALL)

    handle = worker.runtime.sampler.pipeline.unet.register_forward_pre_hook(hook)
    try:
        run_next_job(worker)
    finally:
        handle.remove()
    return queued["job_id"], calls


def images_generated(worker, settings, tenant: str) -> int:
    field = counter_field("images_generated", {"tenant": tenant})
    return int(float(worker.runtime.redis.hget(counter_key(settings.redis_prefix), field) or 0))


def run_until_final(client, headers, worker, job_id: str) -> JobPublic:
    while not job(client, headers, job_id).state.is_terminal:
        run_next_job(worker)
    return job(client, headers, job_id)


def test_a_small_job_waits_about_one_chunk_behind_a_large_one(setup):
    client, headers, worker, settings = setup
    large = submit(client, headers["alpha"], LARGE)
    # beta's job comes during alpha's first chunk (8 images: the worker has timed no chunk yet), 2nd of 4 steps
    small, unet_calls = run_with_beta_arriving(client, headers, worker)  # alpha's job runs until it yields
    yielded = job(client, headers["alpha"], large)
    assert yielded.state is JobState.queued, yielded
    assert 1 <= yielded.progress.images_done < LARGE["num_images"]
    record = worker.runtime.redis.hgetall(worker.runtime.keys.job(large))
    preempted_at = float(record["preempted_at"])

    run_next_job(worker)  # the round robin: beta's job now, before the rest of alpha's
    served = job(client, headers["beta"], small)
    assert served.state is JobState.finished and len(served.results) == 1, served

    # beta waited for the rest of the chunk running when it came, then the handover; not for alpha's 64 images
    created, started = served.created_at.timestamp(), served.started_at.timestamp()
    chunk_s = preempted_at - unet_calls[0]  # the chunk beta came in: from its first UNet call to the yield
    assert preempted_at >= created
    assert started - created <= chunk_s + 1.0, (started - created, chunk_s)
    # alpha's job, canceled now to keep the test short: what it has is every image once, from its first seed
    assert client.delete(f"/v1/jobs/{large}", headers=headers["alpha"]).status_code in (200, 202)
    canceled = run_until_final(client, headers["alpha"], worker, large)
    assert canceled.state is JobState.canceled
    done = yielded.progress.images_done
    assert [r.seed for r in canceled.results] == [LARGE["seed"] + i for i in range(done)]
    assert images_generated(worker, settings, "alpha") == done


def test_a_preempted_job_resumes_where_it_stopped_with_the_same_images(setup):
    client, headers, worker, settings = setup
    body = dict(LARGE, num_images=12)  # more than one chunk (8 at most)
    preempted = submit(client, headers["alpha"], body)
    small, _ = run_with_beta_arriving(client, headers, worker)
    assert job(client, headers["alpha"], preempted).state is JobState.queued
    run_next_job(worker)  # beta's
    assert job(client, headers["beta"], small).state is JobState.finished
    resumed = run_until_final(client, headers["alpha"], worker, preempted)
    alone = run_until_final(client, headers["alpha"], worker, submit(client, headers["alpha"], body))

    assert resumed.state is JobState.finished and resumed.progress.images_done == 12, resumed
    assert [r.seed for r in resumed.results] == [body["seed"] + i for i in range(12)]
    assert images_generated(worker, settings, "alpha") == 24  # none twice: 12 for each job
    # an image depends on its seed only: the resumed job's images are the ones a job run at once gets, up to the
    # 8-bit rounding of float differences between batch sizes (test_guided_ddim.py: at most 1e-4 before rounding)
    for mine, reference in zip(resumed.results, alone.results, strict=True):
        difference = np.abs(
            pixels(client, headers["alpha"], mine.image_id) - pixels(client, headers["alpha"], reference.image_id)
        )
        assert difference.max() <= 1, (mine.seed, difference.max())


def pixels(client, headers, image_id: str) -> np.ndarray:
    response = client.get(f"/v1/images/{image_id}", headers=headers)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def test_a_preempted_job_can_be_canceled_while_it_waits(setup):
    client, headers, worker, settings = setup
    large = submit(client, headers["alpha"], LARGE)
    small, _ = run_with_beta_arriving(client, headers, worker)
    waiting = job(client, headers["alpha"], large)
    assert waiting.state is JobState.queued and waiting.progress.images_done >= 1, waiting
    assert client.delete(f"/v1/jobs/{large}", headers=headers["alpha"]).status_code in (200, 202)
    run_next_job(worker)  # beta's
    assert job(client, headers["beta"], small).state is JobState.finished
    canceled = job(client, headers["alpha"], large)
    assert canceled.state is JobState.canceled, canceled
    assert images_generated(worker, settings, "alpha") == waiting.progress.images_done  # none after it yielded


def test_a_job_paused_by_an_earlier_version_resumes_with_its_images(setup):
    """Before 6 Dec 2026 a record kept its results as one JSON array in its hash; a job that yielded under that
    version and resumes under this one keeps the images it had."""
    client, headers, worker, settings = setup
    body = dict(LARGE, num_images=12)
    paused = submit(client, headers["alpha"], body)
    small, _ = run_with_beta_arriving(client, headers, worker)
    keys, redis = worker.runtime.keys, worker.runtime.redis
    earlier = [json.loads(result) for result in redis.lrange(keys.results(paused), 0, -1)]
    assert 1 <= len(earlier) < 12
    redis.hset(keys.job(paused), "results", json.dumps(earlier))  # the record as the earlier version left it
    redis.delete(keys.results(paused))
    run_next_job(worker)  # beta's
    resumed = run_until_final(client, headers["alpha"], worker, paused)
    assert resumed.state is JobState.finished and resumed.progress.images_done == 12, resumed
    assert [r.seed for r in resumed.results] == [body["seed"] + i for i in range(12)]
    assert [r.image_id for r in resumed.results[: len(earlier)]] == [r["image_id"] for r in earlier]
    assert images_generated(worker, settings, "alpha") == 12
    assert not redis.hexists(keys.job(paused), "results")  # moved into the list when it resumed
