"""Errors on the wire: HTTP errors and failed jobs alike carry an `ErrorBody`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """What went wrong, for a person: a stable code and a message (HTTP errors and failed jobs alike)."""

    code: str = Field(description="machine-readable reason, e.g. invalid_job, worker_error, not_found")
    message: str = Field(description="what went wrong and what to do about it")


class ErrorResponse(BaseModel):
    error: ErrorBody = Field(description="the error")
