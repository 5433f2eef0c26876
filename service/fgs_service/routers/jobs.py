"""Job status, server-sent progress events, listing and cancel. Another tenant's job is a 404."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated

import anyio
import redis
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fgs_common.wire import ErrorBody, JobListQuery, JobProgressEvent, JobPublic, JobsPublic
from fgs_service.deps import JobQueueDep, SettingsDep, SseStreamsDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError, not_found

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

_KEEPALIVE_S = 15.0


def _owned_job(job_id: str, tenant: TenantDep, queue: JobQueueDep) -> JobPublic:
    """The job's public view if it belongs to the caller (404 otherwise, also for other tenants' jobs)."""
    job = queue.job(tenant, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


OwnedJob = Annotated[JobPublic, Depends(_owned_job)]


@router.get("")
def list_jobs(tenant: TenantDep, queue: JobQueueDep, query: Annotated[JobListQuery, Query()]) -> JobsPublic:
    """The caller's jobs, newest first."""
    return queue.list_jobs(tenant, query.state, query.limit, query.offset)


@router.get("/{job_id}")
def get_job(job: OwnedJob) -> JobPublic:
    return job


@router.delete("/{job_id}", status_code=202)
def cancel_job(job: OwnedJob, tenant: TenantDep, queue: JobQueueDep) -> JobPublic:
    """Cancel: a queued job never runs; a running job stops at its next denoising step."""
    if job.state.is_terminal:
        raise ApiError(409, "job_finished", f"job {job.job_id} is already {job.state.value}")
    queue.cancel(tenant, job.job_id)
    after = queue.job(tenant, job.job_id)
    if after is None:  # the record expired in between
        raise not_found("job", job.job_id)
    return after


@router.get(
    "/{job_id}/events", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
async def job_events(
    job: OwnedJob,
    request: Request,
    tenant: TenantDep,
    queue: JobQueueDep,
    settings: SettingsDep,
    streams: SseStreamsDep,
) -> StreamingResponse:
    """Server-sent events: a `progress` event (a JobProgressEvent: state and progress only) per change while the
    job is queued or running, then one `job` event (the whole JobPublic, results included) in its final state.

    When Redis stops answering, an `error` event (an ErrorBody, code `redis_unavailable`) ends the stream, so a
    client knows to reconnect rather than take the closed stream for the job's end. A tenant holds at most
    FGS_MAX_SSE_STREAMS_PER_TENANT streams open at once; beyond that, 429 with Retry-After.
    """
    streams.acquire(tenant.name)

    async def stream():
        last = None
        last_sent = time.monotonic()
        while True:
            try:
                current = await anyio.to_thread.run_sync(queue.job, tenant, job.job_id)
            except redis.RedisError as error:
                message = f"the job store is unavailable ({type(error).__name__}); reconnect"
                body = ErrorBody(code="redis_unavailable", message=message)
                yield f"event: error\ndata: {body.model_dump_json()}\n\n"
                return
            if current is None:
                return
            if current.state.is_terminal:
                event, payload = "job", current.model_dump_json()
            else:  # the request and results stay out of the stream: they never change, or come with the end
                event, payload = (
                    "progress",
                    JobProgressEvent.model_validate(current, from_attributes=True).model_dump_json(),
                )
            if payload != last:
                last, last_sent = payload, time.monotonic()
                yield f"event: {event}\ndata: {payload}\n\n"
            elif time.monotonic() - last_sent > _KEEPALIVE_S:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
            if current.state.is_terminal or await request.is_disconnected():
                return
            await asyncio.sleep(settings.sse_poll_s)

    return _HeldStream(
        stream(),
        release=lambda: streams.release(tenant.name),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class _HeldStream(StreamingResponse):
    """A stream that gives its tenant's slot back however it ends (the job's end, a disconnect, an error),
    also when the generator never started, where a `finally` in the generator would not run."""

    def __init__(self, content, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
