"""Worker lifecycle: SIGTERM drains the job in hand; failures are retried, then surface as `failed`."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from support.live_calls import JobState, generate, get_job, png_bytes, wait_final, wait_for
from support.stack import start_stack


@pytest.fixture(scope="module")
def own_stack(redis_server, tiny_model_dir, tmp_path_factory):
    """Its own API and two workers (own Redis prefix): this module kills workers."""
    stack = start_stack(redis_server, tiny_model_dir, tmp_path_factory.mktemp("lifecycle"), workers=2)
    yield stack
    stack.close()


def test_sigterm_finishes_the_job_in_hand_then_exits(own_stack):
    with own_stack.client("alpha") as client:
        long_job = generate(client, num_images=8, steps=150, guidance_every=5)
        wait_for(client, long_job, lambda j: j.state is JobState.running and j.progress.step >= 3, timeout=120)
        # conftest names workers w<index>-<random>
        worker_name = redis.Redis.from_url(own_stack.redis_url, decode_responses=True).hget(
            f"{own_stack.prefix}:job:{long_job}", "worker"
        )
        victim = own_stack.workers[int(worker_name.split("-")[0][1:])]

        victim.send_signal(signal.SIGTERM)
        next_job = generate(client, num_images=1, steps=2, guidance_every=1)

        finished = wait_final(client, long_job, timeout=300)
        assert finished.state is JobState.finished and finished.progress.images_done == 8
        assert victim.wait(timeout=60) == 0
        assert wait_final(client, next_job).state is JobState.finished
        taker = redis.Redis.from_url(own_stack.redis_url, decode_responses=True).hget(
            f"{own_stack.prefix}:job:{next_job}", "worker"
        )
        assert taker != worker_name
        # the exited worker no longer counts as alive
        alive = redis.Redis.from_url(own_stack.redis_url).exists(f"{own_stack.prefix}:worker:{worker_name}")
        assert alive == 0


def test_failing_job_is_retried_then_failed_with_its_error(own_stack):
    from rq.registry import FailedJobRegistry
    from rq.serializers import JSONSerializer

    with own_stack.client("beta") as client:
        image_id = client.post("/v1/images", files={"file": ("c.png", png_bytes(9), "image/png")}).json()["image_id"]
        # Damage the stored file behind the API's back: every attempt fails while reading it.
        stored = own_stack.data_dir / "tenants" / "beta" / "images" / f"{image_id}.png"
        stored.write_bytes(b"damaged")
        job_id = generate(client, conditioning_image_ids=[image_id])
        saw_retry = False
        final = None
        for _ in range(600):
            job = get_job(client, job_id)
            saw_retry |= job.error is not None and job.error.code == "retrying"
            if job.state.is_terminal:
                final = job
                break
            time.sleep(0.05)
        assert final is not None and final.state is JobState.failed
        assert final.error.code == "worker_error" and "UnidentifiedImageError" in final.error.message
        assert saw_retry
        registry = FailedJobRegistry(
            f"{own_stack.prefix}:beta", connection=redis.Redis.from_url(own_stack.redis_url), serializer=JSONSerializer
        )
        assert job_id in registry.get_job_ids()


def test_a_stop_that_arrives_while_busy_ends_the_idle_loop(redis_server, tiny_model_dir, tmp_path):
    """SIGTERM just after a job (RQ still counts the worker busy) only sets a flag; the worker must still exit.

    This is the race that once kept `fgs up` from stopping on Ctrl-C: the idle loop polled forever.
    """
    import threading

    from rq.exceptions import StopRequested

    from fgs_common.settings import Settings
    from fgs_worker.main import FgsWorker
    from fgs_worker.runtime import WorkerRuntime

    settings = Settings(
        redis_url=redis_server,
        redis_prefix="fgs-test-stopflag",
        model=str(tiny_model_dir),
        device="cpu",
        data_dir=tmp_path,
    )
    worker = FgsWorker(WorkerRuntime.load(settings, name="stopflag"))
    worker._stop_requested = True  # what RQ's SIGTERM handler does when the state is still 'busy'
    outcome: list[BaseException] = []

    def poll() -> None:
        try:
            worker.dequeue_job_and_maintain_ttl(timeout=1)
        except BaseException as error:  # noqa: BLE001 - the test wants whatever ended the loop
            outcome.append(error)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the idle loop kept polling after a stop request"
    assert len(outcome) == 1 and isinstance(outcome[0], StopRequested)


def test_a_killed_workers_job_is_taken_over_and_finished(redis_server, tiny_model_dir, tmp_path):
    """SIGKILL mid-job (no chance to clean up): once its heartbeats stop for FGS_ABANDONED_AFTER_S, another
    worker retries the job, takes its record over and finishes it."""
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=2, extra_env={"FGS_ABANDONED_AFTER_S": "4"})
    try:
        with stack.client("alpha") as client:
            job_id = generate(client, num_images=4, steps=120, guidance_every=5)
            wait_for(client, job_id, lambda j: j.state is JobState.running and j.progress.step >= 3, timeout=120)
            records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
            first = records.hget(f"{stack.prefix}:job:{job_id}", "worker")
            victim = stack.workers[int(first.split("-")[0][1:])]
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)

            finished = wait_final(client, job_id, timeout=240)
            assert finished.state is JobState.finished, finished
            assert finished.progress.images_done == 4 and len(finished.results) == 4
            assert records.hget(f"{stack.prefix}:job:{job_id}", "worker") != first
            for result in finished.results:
                assert client.get(f"/v1/images/{result.image_id}").status_code == 200
    finally:
        stack.close()
