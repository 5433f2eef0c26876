"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fgs_service.deps import JobQueueDep, StoreDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    redis: bool | None = None
    workers: int | None = None
    store_writable: bool | None = None
    store_error: str | None = None


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(queue: JobQueueDep, store: StoreDep):
    """Ready when Redis answers and the artifact store takes a write; the body counts the live workers.

    Zero workers is still 200: with workers scaled to zero (KEDA scales on queue length) the API must stay
    in its Service to accept the jobs that make the workers come back. 503 when Redis is unreachable or the
    store cannot be written (a full disk: uploads would fail).
    """
    store_error = store.writable()
    if store_error is not None:
        body = Health(status="artifact store unwritable", store_writable=False, store_error=store_error)
        return JSONResponse(body.model_dump(), status_code=503)
    try:
        queue.ping()
        workers = len(queue.live_worker_names())
    except Exception:  # any Redis failure means not ready; the probe must answer, not raise
        body = Health(status="redis unreachable", redis=False, store_writable=True)
        return JSONResponse(body.model_dump(), status_code=503)
    status = "ready" if workers else "ready, no live workers"
    return Health(status=status, redis=True, workers=workers, store_writable=True)
