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
