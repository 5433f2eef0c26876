"""The read-only views behind the web page: job summaries, gallery, compare grid, operator view.

Views over job records that the page and scripts read, built on the job and generation models; no request body
depends on them.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated

from pydantic import BaseModel, Field, PlainSerializer

from fgs_common.wire.generation import ClassIndex, GenerationParams, Prompt
from fgs_common.wire.jobs import ImageResult, JobBase

# A seed in a view's JSON is a string: seeds reach 2^63 - 1 and JavaScript's numbers round integers past 2^53
# (975561995220926170 shows as ...200), so the page never sees a seed as a number. The API's models keep integers.
SeedText = Annotated[int, PlainSerializer(str, return_type=str, when_used="json")]
ClassName = Annotated[
    str, Field(description="the team's name of the class: its classifier spec's class_names, else the job's prompt")
]


class JobSummaries(BaseModel):
    """A page of the jobs table: each job without its results, light enough to poll."""

    jobs: list[JobBase] = Field(description="a page of the tenant's jobs, newest first")
    total: int = Field(description="all jobs of the tenant still on record")
    offset: int = Field(description="index of the first job of this page")


class FailedJob(JobBase):
    """A failed job (`error` says why, `finished_at` when) and whose it is."""

    tenant: str = Field(description="the job's tenant")


class GallerySort(str, Enum):
    """Order of gallery images."""

    seed = "seed"  # job order, then seed: the order they were generated in
    criterion_asc = "criterion_asc"
    criterion_desc = "criterion_desc"


class GalleryItem(ImageResult):
    """One generated image and how it was made: its result, with its job's prompt, class and settings."""

    seed: SeedText = Field(description="the seed this image was sampled with (a string: 64 bits)")
    job_id: str = Field(description="the job that made it")
    class_index: ClassIndex
    class_name: ClassName
    prompt: Prompt
    predicted_name: str | None = Field(None, description="the name of predicted_class (as class_name is named)")
    group: str | None = Field(None, description="the dataset group its job fills (a NICO++ context), if any")
    generation: GenerationParams = Field(description="the generation parameters of its job")
    disagrees: bool | None = Field(None, description="the classifier predicts another class than the intended one")


class ClassCount(BaseModel):
    class_index: int = Field(description="a class in the gallery's scope")
    class_name: ClassName
    prompt: str = Field(description="the prompt of its first job")
    images: int = Field(description="images of that class in scope")


class GalleryPage(BaseModel):
    items: list[GalleryItem] = Field(description="this page's images")
    total: int = Field(description="images matching the filters, over all pages")
    offset: int = Field(description="index of this page's first image")
    limit: int = Field(description="page size asked for")
    classes: list[ClassCount] = Field(description="the classes in scope (before the class filter)")
    groups: list[str] = Field(description="the groups in scope (before the group filter), sorted")
    conditioning_image_ids: list[str] = Field(description="real images the shown jobs were conditioned on (≤ 16)")


class CompareRows(str, Enum):
    """What varies down the compare grid."""

    omega = "omega"
    criterion = "criterion"
    setting = "setting"  # criterion, ω, γ and p together


class CompareRow(BaseModel):
    label: str = Field(description="the row's setting, e.g. 'ω=0.1'")
    cells: list[GalleryItem | None] = Field(description="one image per seed column (null: no image with that seed)")


class CompareGrid(BaseModel):
    class_index: int = Field(description="the class compared")
    class_name: ClassName
    rows_by: CompareRows = Field(description="what varies down the rows")
    seeds: list[SeedText] = Field(description="the seed of each column (strings: 64 bits)")
    rows: list[CompareRow] = Field(description="one row per setting")


class TenantLoadPublic(BaseModel):
    """A tenant's share of the queue, for the operator view."""

    tenant: str = Field(description="tenant name")
    queued_jobs: int = Field(ge=0, description="jobs waiting in its queue")
    queued_images: int = Field(ge=0, description="images of its queued and running jobs")
    running_jobs: int = Field(ge=0, description="its jobs being sampled now")


class WorkerPublic(BaseModel):
    """A worker with a live heartbeat and what it runs."""

    name: str = Field(description="worker name")
    last_heartbeat: datetime | None = Field(None, description="its last heartbeat")
    job_id: str | None = Field(None, description="the job it is running, if any")
    job_tenant: str | None = Field(None, description="that job's tenant")


class ThroughputMinute(BaseModel):
    """Images finished in one minute."""

    minute: datetime = Field(description="start of the minute")
    images: float = Field(description="images finished in that minute")


class OperatorOverview(BaseModel):
    tenants: list[TenantLoadPublic] = Field(description="load per tenant with a queue")
    workers: list[WorkerPublic] = Field(description="workers with a live heartbeat")
    throughput: list[ThroughputMinute] = Field(description="images per minute over the last 10 minutes, oldest first")
    images_per_s_last_minute: float = Field(description="images per second over the last minute")
    failed_jobs: list[FailedJob] = Field(description="recently failed jobs, newest first")
    generated_at: datetime = Field(description="when this overview was read")
