"""Cooperative cancellation: a flag in Redis, checked between denoising steps.

The worker does not fork per job, so it cannot kill a job from outside; the API sets
`{prefix}:cancel:{job_id}` and the sampler's step callback raises JobCanceled at the next step boundary.
JobCanceled is a BaseException so that no `except Exception` on the way up can swallow it.
"""

from __future__ import annotations


class JobCanceled(BaseException):
    """The job was canceled through the API; raised only between denoising steps."""


def cancel_requested(redis, cancel_key: str) -> bool:
    return bool(redis.exists(cancel_key))
