"""The job watchdog: a thread that ends the worker process when a denoising step overruns its deadline.

A step stuck inside C++ (a classifier that loops on some batch size, an impossible allocation) never returns to
Python: no heartbeat, no cancel check, SIGTERM handled never. Only something outside the stuck call can act, so
this thread watches the clock and, past the deadline (or past `cancel_grace_s` after a cancel), it
1. writes the outcome into the record of every job of the batch (one job, or the jobs of a shared batch,
   fgs_worker.shared_batch), each fenced by its own owner token: back to `queued` with the reason while RQ has
   retries left for that job, else `failed` (a poison job); a job whose cancel was not honoured: `canceled`;
2. expires the jobs' executions in RQ's started-job registries, so the next maintenance pass (the restarted
   worker's first one) hands them to RQ's retry at once instead of after FGS_ABANDONED_AFTER_S;
3. ends the process with `os._exit` (no Python cleanup can hang). The supervisor (`fgs up`, Kubernetes)
   restarts the worker.

Deadlines come from the settings (fgs_common.settings: step_deadline_*), scaled by the pixels of the whole
sampler call (a shared batch's images of every job).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fgs_common.settings import Settings
from fgs_common.wire import ErrorBody, JobState

log = logging.getLogger("fgs.worker.watchdog")

# The exit status of a worker the watchdog ended (EX_SOFTWARE, sysexits.h): the supervisor's logs tell it apart.
EXIT_WATCHDOG = 70


def step_deadline_s(settings: Settings, batch_images: int, width: int, height: int) -> float:
    """How long one denoising step (classifier forward included) of this batch may take."""
    megapixels = batch_images * width * height / 1e6
    return settings.step_deadline_base_s + settings.step_deadline_s_per_megapixel * megapixels


@dataclass
class WatchedJob:
    """A job of the running batch: the fence of its record and what RQ has left for it."""

    job_id: str
    owner: str
    retries_left: int
    cancel_seen: float | None = None


@dataclass
class _Armed:
    jobs: dict[str, WatchedJob]
    deadline: float  # time.monotonic() past which the step is stuck
    step_s: float
    expire_execution: Callable[[], None]  # makes RQ take the executions for abandoned at its next sweep


class NullWatchdog:
    """No watchdog (a runtime no worker runs): every call does nothing."""

    def arm(self, jobs: list[WatchedJob], first_deadline_s: float, step_s: float, expire_execution) -> None:
        pass

    def release(self, job_id: str) -> None:
        pass

    def step_done(self) -> None:
        pass

    def disarm(self) -> None:
        pass


class JobWatchdog:
    """One per worker process; `arm` at job start, `step_done` after each step, `disarm` at the end."""

    def __init__(
        self,
        settings: Settings,
        records: Any,
        redis: Any,
        cancel_key_of: Callable[[str], str],
        exit_process: Callable[[int], None] = os._exit,
    ):
        self.settings = settings
        self.records = records
        self.redis = redis
        self.cancel_key_of = cancel_key_of
        self.exit_process = exit_process
        self._armed: _Armed | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="fgs-watchdog", daemon=True)
        self._thread.start()

    def arm(
        self,
        jobs: list[WatchedJob],
        first_deadline_s: float,
        step_s: float,
        expire_execution: Callable[[], None],
    ) -> None:
        with self._lock:
            watched = {job.job_id: job for job in jobs}
            self._armed = _Armed(watched, time.monotonic() + first_deadline_s, step_s, expire_execution)

    def release(self, job_id: str) -> None:
        """A job left the batch (finished, canceled, failed or lost): no longer this watchdog's to end."""
        with self._lock:
            if self._armed is not None:
                self._armed.jobs.pop(job_id, None)

    def step_done(self) -> None:
        with self._lock:
            if self._armed is not None:
                self._armed.deadline = time.monotonic() + self._armed.step_s

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    # ---- the thread ----
    def _watch(self) -> None:
        while True:
            time.sleep(self.settings.watchdog_poll_s)
            with self._lock:
                armed = self._armed
            if armed is None:
                continue
            try:
                stuck = self._stuck(armed)
            except Exception:  # a Redis outage while checking the cancel flags: look again next poll
                log.warning("watchdog could not check jobs %s", list(armed.jobs), exc_info=True)
                continue
            if stuck is not None:
                with self._lock:
                    if self._armed is not armed:  # the batch moved on while we looked
                        continue
                self._end_batch(armed, *stuck)

    def _stuck(self, armed: _Armed) -> tuple[str, str | None] | None:
        """Why the step is stuck, and the job whose cancel was not honoured in time (None: the deadline passed);
        None while it is not."""
        now = time.monotonic()
        if now > armed.deadline:
            message = f"a denoising step ran past its deadline of {armed.step_s:.0f} s (FGS_STEP_DEADLINE_*)"
            return message + ": the worker was restarted", None
        jobs = list(armed.jobs.values())
        with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.exists(self.cancel_key_of(job.job_id))
            flags = pipe.execute()
        for job, canceled in zip(jobs, flags, strict=True):
            if not canceled:
                continue
            if job.cancel_seen is None:
                job.cancel_seen = now
            elif now - job.cancel_seen > self.settings.cancel_grace_s:
                return f"job {job.job_id} was canceled while a step was stuck: the worker was restarted", job.job_id
        return None

    def _outcome(self, job: WatchedJob, message: str, canceled: str | None) -> tuple[JobState, str, str]:
        """What the stuck step means for one job of the batch."""
        if job.job_id == canceled:
            return JobState.canceled, "canceled", "canceled while a step was stuck: the worker was restarted"
        if job.retries_left > 0:
            return JobState.queued, "retrying", message
        return JobState.failed, "step_timeout", message + f"; given up after {self.settings.job_retries} retries"

    def _end_batch(self, armed: _Armed, message: str, canceled: str | None) -> None:
        log.critical("jobs %s: %s; ending this worker process", list(armed.jobs), message)
        try:
            for job in list(armed.jobs.values()):
                state, code, text = self._outcome(job, message, canceled)
                error = "" if state is JobState.canceled else ErrorBody(code=code, message=text).model_dump_json()
                fields: dict = {"error": error} if error else {}
                if state.is_terminal:
                    fields["finished_at"] = time.time()
                self.records.transition(job.job_id, state, (JobState.running,), expect_owner=job.owner, **fields)
            armed.expire_execution()
        except Exception:  # Redis unreachable: the abandon sweep and the reconciler settle the jobs later
            log.exception("watchdog could not record the end of jobs %s", list(armed.jobs))
        finally:
            self.exit_process(EXIT_WATCHDOG)
