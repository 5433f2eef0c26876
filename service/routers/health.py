"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fgs_service.deps import JobQueueDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    redis: bool | None = None
    workers: int | None = None


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(queue: JobQueueDep):
    """Ready when Redis answers; the body counts the workers with a recent heartbeat.

    Zero workers is still 200: with workers scaled to zero (KEDA scales on queue length) the API must stay
    in its Service to accept the jobs that make the workers come back. 503 only when Redis is unreachable.
    """
    try:
        queue.ping()
        workers = len(queue.live_worker_names())
    except Exception:  # any Redis failure means not ready; the probe must answer, not raise
        return JSONResponse(Health(status="redis unreachable", redis=False).model_dump(), status_code=503)
    return Health(status="ready" if workers else "ready, no live workers", redis=True, workers=workers)
