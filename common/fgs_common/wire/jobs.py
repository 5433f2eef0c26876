"""Jobs: their lifecycle (`JobState`), what a job is while it runs (`JobBase` -> `JobPublic` with its results), its
progress events, and the jobs list."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from fgs_common.wire.errors import ErrorBody
from fgs_common.wire.generation import GenerateRequest


class JobState(str, Enum):
    """One job lifecycle for worker, API and client."""

    queued = "queued"
    running = "running"
    finished = "finished"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.finished, JobState.failed, JobState.canceled)


class JobAccepted(BaseModel):
    """202 of POST /v1/generate: where to follow the job."""

    job_id: str = Field(description="the new job's id")


class JobProgress(BaseModel):
    """How far a job is: images written, and the step of the chunk being sampled."""

    images_done: int = Field(0, description="images written to the artifact store so far")
    images_total: int = Field(0, description="images the job makes in all")
    step: int = Field(0, description="denoising step of the chunk being sampled")
    steps_total: int = Field(0, description="denoising steps per chunk")


class ImageResult(BaseModel):
    image_id: str = Field(description="id of the generated PNG (GET /v1/images/{image_id})")
    seed: int = Field(description="the seed this image was sampled with")
    criterion_value: float | None = Field(
        None, description="final criterion value C; null without a classifier, or when it was not finite"
    )
    criterion_not_finite: bool = Field(
        False, description="the criterion's value was NaN or infinite (JSON cannot carry it; criterion_value is null)"
    )
    predicted_class: int | None = Field(None, description="the classifier's arg-max class for the image")


class JobBase(BaseModel):
    """A job without its results: what the page's jobs table reads; `JobPublic` adds the results."""

    job_id: str = Field(description="the job's id")
    state: JobState = Field(description="queued, running, finished, failed or canceled")
    request: GenerateRequest = Field(description="the request the job was created with")
    progress: JobProgress = Field(description="images and denoising steps done")
    error: ErrorBody | None = Field(None, description="why the job failed (or is being retried)")
    batch_id: str | None = Field(None, description="the batch the job belongs to, if any")
    created_at: datetime = Field(description="when the job was queued")
    started_at: datetime | None = Field(None, description="when a worker took the job")
    finished_at: datetime | None = Field(None, description="when the job reached its final state")


class JobProgressEvent(BaseModel):
    """A `progress` event of GET /v1/jobs/{job_id}/events: what changed while the job runs, without its request."""

    job_id: str = Field(description="the job's id")
    state: JobState = Field(description="queued or running (the final state comes as a `job` event)")
    progress: JobProgress = Field(description="images and denoising steps done")
    error: ErrorBody | None = Field(None, description="why the last attempt failed, while the job is retried")


class JobPublic(JobBase):
    """A job with one result per image written so far."""

    results: list[ImageResult] = Field(default_factory=list, description="one entry per image written so far")


# A tenant holds at most max_queued_images (2,000,000 by default) queued jobs plus its kept history; a billion
# is past any real list and far inside what Redis accepts as a range index (a signed 64-bit integer).
MAX_LIST_OFFSET = 1_000_000_000


class JobListQuery(BaseModel):
    """The query of GET /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    state: JobState | None = Field(None, description="only jobs in this state")
    limit: int = Field(100, ge=1, le=1000, description="at most this many jobs")
    offset: int = Field(0, ge=0, le=MAX_LIST_OFFSET, description="skip this many of the newest jobs first")


class JobsPublic(BaseModel):
    jobs: list[JobPublic] = Field(description="the jobs, newest first")
    count: int = Field(description="number of jobs in this page")
    total: int = Field(description="the tenant's jobs in all states, the range that limit and offset page through")
