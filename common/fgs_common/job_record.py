"""`JobRecord`: one stored job, typed. Read by `fgs_common.job_records.JobRecords.read` (the API's reads, the
worker's claim, the reconcilers) and parsed there once; besides it, only narrow reads of a few fields
(`JobRecords.summaries`, the queue's list pages) name fields.

A record is three Redis values (`fgs_common.job_records.Keys`): the hash of small fields (state, progress,
owner, times), the GenerateRequest JSON beside it, and the list of ImageResult JSONs, one per image written, which
the worker appends to after each chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from fgs_common.wire import STORED, ErrorBody, GenerateRequest, ImageResult, JobBase, JobProgress, JobPublic, JobState


def _time(value: str | None) -> float | None:
    return float(value) if value else None


def _datetime(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


@dataclass(frozen=True)
class JobRecord:
    """A job as stored. `results` is None when it was read without them (summaries, the operator view)."""

    job_id: str
    tenant: str
    state: JobState
    request: GenerateRequest
    images_total: int = 0
    images_done: int = 0
    step: int = 0
    steps_total: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    batch_id: str | None = None
    batch_key: str = ""  # jobs of one key may share a sampler call (fgs_worker.shared_batch)
    worker: str = ""  # the worker that claimed it last
    owner: str = ""  # that claim's fence token (fgs_common.job_records)
    resume: bool = False  # it yielded its worker: the next claim keeps its results and goes on after them
    error: ErrorBody | None = None
    results: tuple[ImageResult, ...] | None = None

    @classmethod
    def parse(cls, job_id: str, fields: dict[str, str], request: str, results: list[str] | None) -> JobRecord:
        """The record from its stored parts: the hash's fields, the request JSON, the results list (or None)."""
        return cls(
            job_id=job_id,
            tenant=fields.get("tenant", ""),
            state=JobState(fields["state"]),
            request=GenerateRequest.model_validate_json(request, context=STORED),
            images_total=int(fields.get("images_total") or 0),
            images_done=int(fields.get("images_done") or 0),
            step=int(fields.get("step") or 0),
            steps_total=int(fields.get("steps_total") or 0),
            created_at=_time(fields.get("created_at")),
            started_at=_time(fields.get("started_at")),
            finished_at=_time(fields.get("finished_at")),
            batch_id=fields.get("batch_id") or None,
            batch_key=fields.get("batch_key", ""),
            worker=fields.get("worker", ""),
            owner=fields.get("owner", ""),
            resume=fields.get("resume") == "1",
            error=ErrorBody.model_validate_json(fields["error"]) if fields.get("error") else None,
            results=None if results is None else _results(results, fields.get("results")),
        )

    def base(self) -> JobBase:
        """The wire view without the results."""
        return JobBase(
            job_id=self.job_id,
            state=self.state,
            request=self.request,
            progress=JobProgress(
                images_done=self.images_done,
                images_total=self.images_total,
                step=self.step,
                steps_total=self.steps_total,
            ),
            error=self.error,
            batch_id=self.batch_id,
            created_at=_datetime(self.created_at) or datetime.now(UTC),
            started_at=_datetime(self.started_at),
            finished_at=_datetime(self.finished_at),
        )

    def public(self) -> JobPublic:
        """The wire view with the results (a record read without them shows none)."""
        return JobPublic(**dict(self.base()), results=list(self.results or ()))


def _results(listed: list[str], in_hash: str | None) -> tuple[ImageResult, ...]:
    """The results list; for a record written before results had a list of their own (6 Dec 2026), the JSON
    array its hash kept in `results` (records live 30 days: a finished job of an earlier version keeps its images)."""
    if not listed and in_hash:
        return tuple(ImageResult.model_validate(result) for result in json.loads(in_hash))
    return tuple(ImageResult.model_validate_json(result) for result in listed)
