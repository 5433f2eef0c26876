"""The operator view: every tenant's load, live workers, throughput and failures (admin keys only)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from fastapi import APIRouter

from fgs_common.job_records import job_base
from fgs_common.wire import ErrorResponse, FailedJob, JobState, OperatorOverview, ThroughputMinute
from fgs_service.deps import AdminDep, JobQueueDep
from fgs_service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses={**ERROR_RESPONSES, 403: {"model": ErrorResponse}})

THROUGHPUT_MINUTES = 10  # RQ keeps finished jobs for 600 s: the window the records cover


def _utc(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


def _share_in(raw: dict[str, str], low: float, high: float, now: float) -> float:
    """The share of a job's run time that falls in [low, high): its images are counted evenly over that time."""
    start = float(raw["started_at"])
    end = float(raw["finished_at"]) if raw.get("finished_at") else now
    overlap = min(end, high) - max(start, low)
    return max(overlap, 0.0) / max(end - start, 1e-3)


def _images_between(records: dict[str, dict[str, str]], low: float, high: float, now: float) -> float:
    return sum(
        int(raw.get("images_done") or 0) * _share_in(raw, low, high, now)
        for raw in records.values()
        if raw.get("started_at")
    )


@router.get("/overview")
def overview(_: AdminDep, queue: JobQueueDep) -> OperatorOverview:
    """Queued images per tenant, live workers with their last heartbeat and job, images per minute, failures."""
    now = time.time()
    records = queue.recent_job_records()
    first_minute = math.floor(now / 60) - THROUGHPUT_MINUTES + 1
    minutes = [(first_minute + i) * 60 for i in range(THROUGHPUT_MINUTES)]
    failed = sorted(
        (
            FailedJob(**dict(job_base(job_id, raw)), tenant=raw.get("tenant", ""))
            for job_id, raw in records.items()
            if raw.get("state") == JobState.failed.value
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
