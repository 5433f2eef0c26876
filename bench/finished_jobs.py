"""Finished jobs written straight into a stack's Redis, for the benchmarks of what reads them (bench/gallery.py,
bench/ui.py): enqueued through `JobQueue` as the API enqueues, then moved running -> finished through the job
records with the results each benchmark makes, so the views read what a worker would have written."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis
import redis.asyncio

from fgs_common.job_records import now_ts
from fgs_common.settings import Settings
from fgs_common.wire import GenerateRequest, ImageResult, JobState
from fgs_service.auth import Tenant
from fgs_service.job_queue import JobQueue


def digit_requests(jobs: int, images_per_job: int, classes: int) -> list[GenerateRequest]:
    """Entropy-guided jobs over the classes and four ω (the compare view's settings)."""
    return [
        GenerateRequest(
            prompt=f"a photo of digit {j % classes}",
            class_index=j % classes,
            num_images=images_per_job,
            seed=1000 * j,
            criterion="entropy",
            omega=[0.0, 0.03, 0.1, 0.3][(j // classes) % 4],
            classifier_id="0" * 64,
        )
        for j in range(jobs)
    ]


def write_finished_jobs(
    settings: Settings,
    tenant: Tenant,
    requests: list[GenerateRequest],
    results_of: Callable[[int, GenerateRequest], list[ImageResult]],
    batch_id: str | None = None,
) -> str | None:
    """Every request as one finished job of `tenant` with `results_of(number, request)`; returns the batch id."""
    sync = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    raw = redis.Redis.from_url(settings.redis_url)

    async def enqueue():
        async_redis = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        enqueued = await JobQueue(sync, raw, async_redis, settings).enqueue(tenant, requests, batch_id=batch_id)
        await async_redis.aclose()
        return enqueued

    enqueued = asyncio.run(enqueue())
    records = JobQueue(sync, raw, None, settings).records
    for number, (job_id, request) in enumerate(zip(enqueued.ids, requests, strict=True)):
        results = results_of(number, request)
        assert records.transition(
            job_id, JobState.running, (JobState.queued,), started_at=now_ts(), worker="bench", owner="bench"
        )
        assert records.set_progress(job_id, "bench", results_from=0, results=results)
        assert records.transition(
            job_id, JobState.finished, (JobState.running,), finished_at=now_ts(), images_done=len(results)
        )
    raw.delete(JobQueue(sync, raw, None, settings).queue(tenant.name).key)  # nothing for a worker to pick up
    return enqueued.batch_id
