"""POST /v1/generate (one job), POST /v1/batches (a whole plan), GET /v1/batches/{batch_id}."""

from __future__ import annotations

import uuid
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Header

from fgs_common.artifact_store import ArtifactStore
from fgs_common.exceptions import EnqueueInProgress
from fgs_common.pixel_limit import over_pixel_limit
from fgs_common.wire import (
    BatchAccepted,
    BatchCanceled,
    BatchCreate,
    BatchPublic,
    Criterion,
    GenerateRequest,
    JobAccepted,
)
from fgs_service.auth import Tenant
from fgs_service.classifier_records import classifier_record
from fgs_service.deps import JobQueueDep, StoreDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError, not_found
from fgs_service.job_queue import JobQueue, QueueFull

router = APIRouter(tags=["generate"], responses=ERROR_RESPONSES)

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def check_references(store: ArtifactStore, tenant: Tenant, requests: list[GenerateRequest]) -> None:
    """Every referenced image and classifier must be the tenant's own, and fit the request."""
    image_ids = {i for r in requests for i in r.conditioning_image_ids}
    for image_id in sorted(image_ids):
        if store.image_path(tenant.name, image_id) is None:
            raise not_found("image", image_id)
    classifiers = {}
    for request in requests:
        if request.classifier_id is None:
            continue
        if request.classifier_id not in classifiers:
            classifiers[request.classifier_id] = classifier_record(store, tenant.name, request.classifier_id)
        record = classifiers[request.classifier_id]
        if record is None:
            raise not_found("classifier", request.classifier_id)
        if request.class_index >= record.spec.num_classes:
            raise ApiError(
                422,
                "invalid_request",
                f"class_index {request.class_index} is out of range: the classifier has "
                f"{record.spec.num_classes} classes",
            )
        if request.criterion is Criterion.hardness and not record.has_hardness_stats:
            raise ApiError(
                422, "invalid_request", "criterion 'hardness' needs a classifier uploaded with hardness statistics"
            )


async def check_image_size(queue: JobQueue, requests: list[GenerateRequest]) -> None:
    """422 for an image bigger than the workers' model takes (GET /v1/model): one step of it could not finish."""
    info = await queue.model_info()
    if info is None:
        return  # no worker has started yet: the worker refuses it (InvalidJob) instead
    for request in requests:
        too_large = over_pixel_limit(request.width, request.height, info)
        if too_large is not None:
            raise ApiError(422, "image_too_large", too_large)


async def _enqueue(queue, tenant: Tenant, requests: list[GenerateRequest], batch_id: str | None, key: str | None):
    try:
        return await queue.enqueue(tenant, requests, batch_id=batch_id, idempotency_key=key)
    except QueueFull as error:
        raise ApiError(429, "queue_full", str(error), headers={"Retry-After": str(error.retry_after_s)}) from None
    except EnqueueInProgress as error:
        headers = {"Retry-After": str(error.retry_after_s)}
        raise ApiError(409, "enqueue_in_progress", str(error), headers=headers) from None


# Both handlers are async: the enqueue awaits Redis on the event loop (fgs_service.job_queue). The reference
# checks are a few stat() calls and small JSON reads; for a batch they run in a thread.
@router.post("/v1/generate", status_code=202)
async def generate(
    body: GenerateRequest,
    tenant: TenantDep,
    queue: JobQueueDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    """Queue one job of `num_images` images; the same Idempotency-Key returns the first job."""
    check_references(store, tenant, [body])
    await check_image_size(queue, [body])
    enqueued = await _enqueue(queue, tenant, [body], None, idempotency_key)
    return JobAccepted(job_id=enqueued.ids[0])


@router.post("/v1/batches", status_code=202)
async def create_batch(
    body: BatchCreate, tenant: TenantDep, queue: JobQueueDep, store: StoreDep, idempotency_key: IdempotencyKey = None
) -> BatchAccepted:
    """Queue many jobs (a balancing plan) in one call, all or nothing."""
    await anyio.to_thread.run_sync(check_references, store, tenant, body.jobs)
    await check_image_size(queue, body.jobs)
    enqueued = await _enqueue(queue, tenant, body.jobs, uuid.uuid4().hex, idempotency_key)
    if enqueued.replayed:
        job_ids = await anyio.to_thread.run_sync(queue.batch_job_ids, tenant, enqueued.batch_id)
        return BatchAccepted(batch_id=enqueued.batch_id, job_ids=job_ids or [])
    return BatchAccepted(batch_id=enqueued.batch_id, job_ids=enqueued.ids)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, tenant: TenantDep, queue: JobQueueDep) -> BatchPublic:
    """Counts of the batch's jobs by state and its images done / total."""
    summary = queue.batch_summary(tenant, batch_id)
    if summary is None:
        raise not_found("batch", batch_id)
    return summary


@router.delete("/v1/batches/{batch_id}", status_code=202)
def cancel_batch(batch_id: str, tenant: TenantDep, queue: JobQueueDep) -> BatchCanceled:
    """Cancel every job of the batch that has not finished: queued ones never run, running ones stop soon."""
    job_ids = queue.batch_job_ids(tenant, batch_id)
    if job_ids is None:
        raise not_found("batch", batch_id)
    return BatchCanceled(batch_id=batch_id, canceled=queue.cancel_batch(tenant, job_ids))
