"""Driving a real FgsWorker in the test process, one job at a time."""

from __future__ import annotations

import time


def run_next_job(worker, timeout_s: float = 60) -> None:
    """Take the next job (a due retry included) and run it, as the worker's loop does once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = worker.dequeue_job_and_maintain_ttl(timeout=1)
        if result is not None:
            worker.execute_job(*result)
            return
    raise AssertionError("no job came within the timeout")


def in_process_settings(redis_url: str, model_dir, data_dir, name: str, **overrides):
    """Settings for an API and a worker in the test process: the tiny model on CPU, a Redis prefix of their own,
    no classifier-check subprocess, quick retries; `overrides` win."""
    import uuid

    from fgs_common.settings import Settings

    values = dict(
        redis_url=redis_url,
        redis_prefix=f"fgs-test-{name}-{uuid.uuid4().hex[:8]}",
        model=str(model_dir),
        device="cpu",
        data_dir=data_dir,
        job_retries=2,
        retry_backoff_s=[1],
        classifier_check=False,
    )
    return Settings(**(values | overrides))


def start_worker(settings, name: str):
    """A real FgsWorker (model loaded, watchdog running) registered with RQ, driven by `run_next_job`."""
    from fgs_worker.main import FgsWorker
    from fgs_worker.runtime import WorkerRuntime

    worker = FgsWorker(WorkerRuntime.load(settings, name=name))
    worker.register_birth()
    return worker
