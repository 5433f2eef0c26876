"""Cooperative cancellation: a flag in Redis, checked between denoising steps.

The worker does not fork per job, so it cannot kill a job from outside; the API sets
`{prefix}:cancel:{job_id}` and the sampler's step callback raises JobCanceled (fgs_common.exceptions) at the
next step boundary.
"""

from __future__ import annotations


def cancel_requested(redis, cancel_key: str) -> bool:
    return bool(redis.exists(cancel_key))
