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
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(queue: JobQueueDep):
    """Ready when Redis answers and at least one worker has sent a heartbeat recently."""
    try:
        queue.redis.ping()
        workers = sum(1 for _ in queue.redis.scan_iter(match=queue.keys.worker_alive_pattern(), count=1000))
    except Exception:  # any Redis failure means not ready; the probe must answer, not raise
        return JSONResponse(Health(status="redis unreachable", redis=False).model_dump(), status_code=503)
    if workers == 0:
        return JSONResponse(Health(status="no live workers", redis=True, workers=0).model_dump(), status_code=503)
    return Health(status="ready", redis=True, workers=workers)
