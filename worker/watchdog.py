"""The job watchdog: a thread that ends the worker process when a denoising step overruns its deadline.

A step stuck inside C++ (a classifier that loops on some batch size, an impossible allocation) never returns to
Python: no heartbeat, no cancel check, SIGTERM handled never. Only something outside the stuck call can act, so
this thread watches the clock and, past the deadline (or past `cancel_grace_s` after a cancel), it
1. writes the outcome into the job record, fenced by the job's owner token: back to `queued` with the reason
   while RQ has retries left, else `failed` (a poison job) or `canceled`;
2. expires the job's execution in RQ's started-job registry, so the next maintenance pass (the restarted
   worker's first one) hands it to RQ's retry at once instead of after FGS_ABANDONED_AFTER_S;
3. ends the process with `os._exit` (no Python cleanup can hang). The supervisor (`fgs up`, Kubernetes)
   restarts the worker.

Deadlines come from the settings (fgs_common.settings: step_deadline_*), scaled by the batch's pixels.
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
class _Armed:
    job_id: str
    owner: str
    deadline: float  # time.monotonic() past which the job is stuck
    step_s: float
    retries_left: int
    expire_execution: Callable[[], None]  # makes RQ take the execution for abandoned at its next sweep
    cancel_seen: float | None = None


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
        job_id: str,
        owner: str,
        first_deadline_s: float,
        step_s: float,
        retries_left: int,
        expire_execution: Callable[[], None],
    ) -> None:
        with self._lock:
            self._armed = _Armed(
                job_id, owner, time.monotonic() + first_deadline_s, step_s, retries_left, expire_execution
            )

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
                reason = self._overrun(armed)
            except Exception:  # a Redis outage while checking the cancel flag: look again next poll
                log.warning("watchdog could not check job %s", armed.job_id, exc_info=True)
                continue
            if reason is not None:
                with self._lock:
                    if self._armed is not armed:  # the job moved on while we looked
                        continue
                self._end_job(armed, *reason)

    def _overrun(self, armed: _Armed) -> tuple[JobState, str, str] | None:
        now = time.monotonic()
        if now > armed.deadline:
            message = (
                f"a denoising step ran past its deadline of {armed.step_s:.0f} s (FGS_STEP_DEADLINE_*): "
                "the worker was restarted"
            )
            if armed.retries_left > 0:
                return JobState.queued, "retrying", message
            return JobState.failed, "step_timeout", message + f"; given up after {self.settings.job_retries} retries"
        if self.redis.exists(self.cancel_key_of(armed.job_id)):
            if armed.cancel_seen is None:
                armed.cancel_seen = now
            elif now - armed.cancel_seen > self.settings.cancel_grace_s:
                return JobState.canceled, "canceled", "canceled while a step was stuck: the worker was restarted"
        return None

    def _end_job(self, armed: _Armed, state: JobState, code: str, message: str) -> None:
        log.critical("job %s: %s; ending this worker process", armed.job_id, message)
        try:
            error = "" if state is JobState.canceled else ErrorBody(code=code, message=message).model_dump_json()
            fields = {"error": error} if error else {}
            if state.is_terminal:
                fields["finished_at"] = time.time()
            self.records.transition(armed.job_id, state, (JobState.running,), expect_owner=armed.owner, **fields)
            armed.expire_execution()
        except Exception:  # Redis unreachable: the abandon sweep and the reconciler settle the job later
            log.exception("watchdog could not record the end of job %s", armed.job_id)
        finally:
            self.exit_process(EXIT_WATCHDOG)
