"""Batches: many jobs submitted at once, all or nothing, and read or canceled together."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fgs_common.wire.generation import GENERATE_EXAMPLE, GenerateRequest
from fgs_common.wire.jobs import JobState


class BatchCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"jobs": [GENERATE_EXAMPLE, GENERATE_EXAMPLE | {"class_index": 1, "prompt": "a handwritten digit one"}]}
            ]
        },
    )
    jobs: Annotated[
        list[GenerateRequest], Field(min_length=1, max_length=10_000, description="one request per job, all or nothing")
    ]


class BatchAccepted(BaseModel):
    batch_id: str = Field(description="the new batch's id")
    job_ids: list[str] = Field(description="its jobs' ids, in request order")


class BatchPublic(BaseModel):
    """GET /v1/batches/{batch_id}: a batch's jobs and how far they are, counted by state."""

    batch_id: str = Field(description="the batch's id")
    job_ids: list[str] = Field(description="its jobs' ids, in request order")
    counts: dict[JobState, int] = Field(description="number of its jobs in each state")
    images_done: int = Field(description="images written, over all its jobs")
    images_total: int = Field(description="images requested, over all its jobs")


class BatchCanceled(BaseModel):
    """DELETE /v1/batches/{batch_id}: how many of its jobs this call canceled."""

    batch_id: str = Field(description="the batch")
    canceled: int = Field(description="jobs canceled now (queued ones never run, running ones stop at their next step)")
