"""The operator view: every tenant's load, live workers, throughput and failures (admin keys only)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from fastapi import APIRouter

from fgs_common.job_record import JobRecord
from fgs_common.wire import ErrorResponse, FailedJob, JobState, OperatorOverview, ThroughputMinute
from fgs_service.deps import AdminDep, JobQueueDep
from fgs_service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses={**ERROR_RESPONSES, 403: {"model": ErrorResponse}})

THROUGHPUT_MINUTES = 10  # RQ keeps finished jobs for 600 s: the window the records cover


def _utc(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


def _share_in(record: JobRecord, low: float, high: float, now: float) -> float:
    """The share of a job's run time that falls in [low, high): its images are counted evenly over that time."""
    start = record.started_at or now
    end = record.finished_at or now
    overlap = min(end, high) - max(start, low)
    return max(overlap, 0.0) / max(end - start, 1e-3)


def _images_between(records: list[JobRecord], low: float, high: float, now: float) -> float:
    return sum(record.images_done * _share_in(record, low, high, now) for record in records if record.started_at)


@router.get("/overview")
def overview(_: AdminDep, queue: JobQueueDep) -> OperatorOverview:
    """Queued images per tenant, live workers with their last heartbeat and job, images per minute, failures."""
    now = time.time()
    records = queue.recent_job_records()
    first_minute = math.floor(now / 60) - THROUGHPUT_MINUTES + 1
    minutes = [(first_minute + i) * 60 for i in range(THROUGHPUT_MINUTES)]
    failed = sorted(
        (
            FailedJob(**dict(record.base()), tenant=record.tenant)
            for record in records
            if record.state is JobState.failed
        ),
        key=lambda job: job.finished_at or datetime.min.replace(tzinfo=UTC),
        reverse=True,
    )
    return OperatorOverview(
        tenants=queue.tenant_loads(),
        workers=queue.live_workers(),
        throughput=[
            ThroughputMinute(minute=_utc(low), images=round(_images_between(records, low, low + 60, now), 2))
            for low in minutes
        ],
        images_per_s_last_minute=round(_images_between(records, now - 60, now, now) / 60, 3),
        failed_jobs=failed,
        generated_at=_utc(now),
    )
