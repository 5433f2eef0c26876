"""Read-only views for the web page: job summaries, the gallery (per job, batch or class) and the compare grid."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query

from fgs_common.artifact_store import ArtifactStore
from fgs_common.wire import CompareGrid, CompareRows, GalleryPage, GallerySort, JobSummaries
from fgs_service.auth import Tenant
from fgs_service.classifier_records import classifier_record
from fgs_service.deps import GalleryCacheDep, JobQueueDep, StoreDep, TenantDep, ViewSlot
from fgs_service.errors import ERROR_RESPONSES, ApiError, not_found
from fgs_service.gallery import GalleryCache, GalleryFilter, JobImages, compare_grid, gallery_page
from fgs_service.job_queue import JobQueue

router = APIRouter(prefix="/v1/views", tags=["views"], responses=ERROR_RESPONSES)

# A gallery without a job or batch shows the tenant's most recent jobs.
RECENT_JOBS = 500

JobId = Annotated[str | None, Query(max_length=64, description="only this job's images")]
BatchId = Annotated[str | None, Query(max_length=64, description="only this batch's images")]


@router.get("/jobs")
def job_summaries(
    tenant: TenantDep,
    queue: JobQueueDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobSummaries:
    """The caller's jobs without their results lists, newest first: light enough to poll."""
    ids = queue.tenant_job_ids(tenant, offset, limit)
    jobs = [record.base() for record in queue.records_of(ids, with_results=False) if record is not None]
    return JobSummaries(jobs=jobs, total=queue.tenant_job_count(tenant), offset=offset)


def _scope(
    queue: JobQueue,
    store: ArtifactStore,
    cache: GalleryCache,
    tenant: Tenant,
    job_id: str | None,
    batch_id: str | None,
) -> list[JobImages]:
    """The jobs a gallery or grid covers: one job, one batch, or the tenant's recent jobs; all the caller's.

    Final jobs come from the cache once parsed (with the team's class names); only the others' records are read
    and parsed."""
    if job_id and batch_id:
        raise ApiError(422, "invalid_request", "give job_id or batch_id, not both")
    if job_id:
        ids = [job_id]
    elif batch_id:
        ids = queue.batch_job_ids(tenant, batch_id)
        if ids is None:
            raise not_found("batch", batch_id)
    else:
        ids = queue.tenant_job_ids(tenant, 0, RECENT_JOBS)
    jobs = {i: job for i in ids if (job := cache.get(tenant.name, i)) is not None}
    missing = [i for i in ids if i not in jobs]
    records = {
        record.job_id: record
        for record in queue.records_of(missing)
        if record is not None and record.tenant == tenant.name
    }
    names: dict[str, list[str] | None] = {}  # the team's class names, from each classifier's spec
    for parsed in JobImages.from_records(list(records.values())):
        classifier_id = parsed.request.classifier_id
        if classifier_id is not None:
            if classifier_id not in names:
                record = classifier_record(store, tenant.name, classifier_id)
                names[classifier_id] = record.spec.class_names if record else None
            parsed.class_names = names[classifier_id]
        jobs[parsed.job_id] = parsed
        record = records[parsed.job_id]
        if record.state.is_terminal:
            cache.put(tenant.name, parsed, record.created_at or 0.0)
    if job_id and not jobs:
        raise not_found("job", job_id)
    return [jobs[i] for i in ids if i in jobs]


@router.get("/gallery", dependencies=[ViewSlot])
async def gallery(
    tenant: TenantDep,
    queue: JobQueueDep,
    store: StoreDep,
    cache: GalleryCacheDep,
    job_id: JobId = None,
    batch_id: BatchId = None,
    class_index: Annotated[int | None, Query(ge=0, description="only images of this intended class")] = None,
    group: Annotated[
        str | None, Query(max_length=200, description="only images of jobs of this group (a NICO++ context)")
    ] = None,
    disagrees: Annotated[
        bool | None, Query(description="true: only images the classifier assigns to another class")
    ] = None,
    min_criterion: Annotated[float | None, Query(description="only images with a criterion value ≥ this")] = None,
    max_criterion: Annotated[float | None, Query(description="only images with a criterion value ≤ this")] = None,
    sort: GallerySort = GallerySort.seed,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> GalleryPage:
    """A page of generated images with their settings and the classifier's verdict."""
    where = GalleryFilter(class_index, group, disagrees, min_criterion, max_criterion)
    jobs = await anyio.to_thread.run_sync(_scope, queue, store, cache, tenant, job_id, batch_id)
    return await anyio.to_thread.run_sync(gallery_page, jobs, where, sort, offset, limit)


@router.get("/compare", dependencies=[ViewSlot])
async def compare(
    tenant: TenantDep,
    queue: JobQueueDep,
    store: StoreDep,
    cache: GalleryCacheDep,
    class_index: Annotated[int, Query(ge=0, description="the class to compare")],
    job_id: JobId = None,
    batch_id: BatchId = None,
    rows: CompareRows = CompareRows.setting,
    seeds: Annotated[int, Query(ge=1, le=32, description="columns: the first this many seeds")] = 8,
) -> CompareGrid:
    """One class across settings: a row per setting (ω, criterion, or all of them), a column per seed."""
    jobs = await anyio.to_thread.run_sync(_scope, queue, store, cache, tenant, job_id, batch_id)
    return compare_grid(jobs, class_index, rows, seeds)
