"""Cooperative cancellation: a flag in Redis, looked at between denoising steps.

The worker does not fork per job, so it cannot kill a job from outside; the API sets `{prefix}:cancel:{job_id}`
and the step callback (fgs_worker.batch_sampling) looks at the flag of every job of its batch at each step
boundary: a canceled job's images leave the batch there and the job ends `canceled`, while the other jobs go on.
A step stuck in C++ never reaches the boundary: the watchdog (fgs_worker.watchdog) ends the process after
FGS_CANCEL_GRACE_S.
"""

from __future__ import annotations


def queue_cancel_check(pipe, cancel_key: str) -> None:
    """Append the look at one job's flag to `pipe` (a Redis pipeline): its reply is 1 when the job was canceled."""
    pipe.exists(cancel_key)
