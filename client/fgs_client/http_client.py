"""`Client`: the fgs wire API v1 over HTTP (httpx), with the typed models of fgs_common.wire."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fgs_common.wire import (
    STORED,
    BatchAccepted,
    BatchCreate,
    BatchPublic,
    ClassifierSpec,
    ClassifierUploaded,
    ErrorResponse,
    GenerateRequest,
    ImageUploaded,
    JobAccepted,
    JobPublic,
    JobState,
    ModelInfo,
)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0


class FgsClientError(Exception):
    """Base of every error the client raises."""


class ServiceUnreachable(FgsClientError):
    """The service does not answer (down, wrong URL, network)."""


class AuthenticationFailed(FgsClientError):
    """The service rejected the API key."""


class ApiError(FgsClientError):
    """The service answered with an error (4xx/5xx) and its `{"error": {code, message}}` body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class JobFailed(FgsClientError):
    """A job ended failed or canceled; `context` (what the job was for) leads the message."""

    def __init__(self, job: JobPublic, context: str = ""):
        error = job.error.message if job.error else job.state.value
        super().__init__(f"{context}job {job.job_id} {job.state.value}: {error}")
        self.job = job


@dataclass(frozen=True)
class GenerationResult:
    job: JobPublic
    images: list[bytes]  # PNG bytes, in the order of job.results

    def pil_images(self):
        """The images as PIL images."""
        from io import BytesIO

        from PIL import Image

        return [Image.open(BytesIO(data)) for data in self.images]


class Client:
    """HTTP client of an fgs service. `Client(url, api_key).generate(prompt=..., class_index=..., num_images=4)`."""

    def __init__(
        self, url: str, api_key: str | None, *, timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 0.5
    ):
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -------------------------------------------------------------- transport

    def _request(
        self, method: str, path: str, *, retry_statuses: frozenset[int] = RETRY_STATUSES, **kwargs: Any
    ) -> httpx.Response:
        """One call with retries on connection errors and retry_statuses; errors become typed exceptions."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                if attempt >= self.retries:
                    raise ServiceUnreachable(
                        f"cannot reach the fgs service at {self.url} ({error.__class__.__name__}: {error})"
                    ) from error
            else:
                if response.status_code not in retry_statuses or attempt >= self.retries:
                    return self._check(response)
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    time.sleep(min(float(retry_after), MAX_RETRY_AFTER_S))
                    attempt += 1
                    continue
            time.sleep(self.backoff_s * 2**attempt)
            attempt += 1

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            body = ErrorResponse.model_validate(response.json()).error
            code, message = body.code, body.message
        except (ValueError, TypeError):
            code, message = "http_error", response.text[:500] or response.reason_phrase
        if response.status_code in (401, 403):
            raise AuthenticationFailed(
                f"the fgs service at {self.url} rejected the API key ({response.status_code}: {message})"
            )
        if response.status_code in (502, 503, 504):
            raise ServiceUnreachable(
                f"the fgs service at {self.url} is unavailable ({response.status_code}: {message})"
            )
        raise ApiError(response.status_code, code, message)

    # -------------------------------------------------------------- endpoints

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def upload_image(self, data: bytes, filename: str = "image.png") -> ImageUploaded:
        """POST /v1/images: a conditioning image (content-addressed by the service)."""
        response = self._request("POST", "/v1/images", files={"file": (filename, data, "application/octet-stream")})
        return ImageUploaded.model_validate(response.json())

    def upload_classifier(
        self, archive: Path, spec: ClassifierSpec, hardness_stats: Path | None = None, name: str | None = None
    ) -> ClassifierUploaded:
        """POST /v1/classifiers: a TorchScript (.pt) or torch.export (.pt2) archive, its spec, optional
        hardness statistics and a name to list it by (default: the archive's file name)."""
        files = {"archive": (archive.name, archive.read_bytes(), "application/octet-stream")}
        with contextlib.ExitStack() as opened:
            if hardness_stats is not None:  # several GB at ImageNet scale: httpx streams an open file (seeks on retry)
                stats = opened.enter_context(open(hardness_stats, "rb"))
                files["hardness_stats"] = (hardness_stats.name, stats, "application/octet-stream")
            form = {"spec": spec.model_dump_json()} | ({"name": name} if name else {})
            response = self._request("POST", "/v1/classifiers", files=files, data=form)
        return ClassifierUploaded.model_validate(response.json())

    def images(self) -> list[ImageUploaded]:
        """GET /v1/images: the caller's uploaded images (conditioning images), oldest first."""
        return [ImageUploaded.model_validate(i) for i in self._request("GET", "/v1/images").json()]

    def delete_image(self, image_id: str) -> None:
        """DELETE /v1/images/{image_id}: a job that still needs it and has not started fails saying so."""
        self._request("DELETE", f"/v1/images/{image_id}")

    def classifier(self, classifier_id: str) -> ClassifierUploaded:
        """GET /v1/classifiers/{classifier_id}: an uploaded classifier's spec, name and date."""
        return ClassifierUploaded.model_validate(self._request("GET", f"/v1/classifiers/{classifier_id}").json())

    def classifiers(self) -> list[ClassifierUploaded]:
        """GET /v1/classifiers: the tenant's classifiers, oldest first."""
        return [ClassifierUploaded.model_validate(c) for c in self._request("GET", "/v1/classifiers").json()]

    def delete_classifier(self, classifier_id: str) -> None:
        """DELETE /v1/classifiers/{classifier_id}."""
        self._request("DELETE", f"/v1/classifiers/{classifier_id}")

    def model_info(self) -> ModelInfo | None:
        """GET /v1/model: what the workers' model takes and knows; None while no worker has published it."""
        try:
            return ModelInfo.model_validate(self._request("GET", "/v1/model").json())
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def submit(
        self, request: GenerateRequest, idempotency_key: str | None = None, wait_when_full: bool = True
    ) -> JobAccepted:
        """POST /v1/generate: one job; the same Idempotency-Key returns the same job.
        wait_when_full=False raises ApiError(429) at once when the tenant's queue is full."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request(
            "POST",
            "/v1/generate",
            content=request.model_dump_json(),
            headers={"Content-Type": "application/json", **headers},
            retry_statuses=RETRY_STATUSES if wait_when_full else RETRY_STATUSES - {429},
        )
        return JobAccepted.model_validate(response.json())

    def submit_batch(
        self, requests: list[GenerateRequest], idempotency_key: str | None = None, wait_when_full: bool = True
    ) -> BatchAccepted:
        """POST /v1/batches: many jobs in one call (all or none are queued)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = BatchCreate(jobs=requests).model_dump_json()
        response = self._request(
            "POST",
            "/v1/batches",
            content=body,
            headers={"Content-Type": "application/json", **headers},
            retry_statuses=RETRY_STATUSES if wait_when_full else RETRY_STATUSES - {429},
        )
        return BatchAccepted.model_validate(response.json())

    def job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json(), context=STORED)

    def batch(self, batch_id: str) -> BatchPublic:
        return BatchPublic.model_validate(self._request("GET", f"/v1/batches/{batch_id}").json())

    def cancel(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def cancel_batch(self, batch_id: str) -> int:
        """DELETE /v1/batches/{batch_id}: cancel the batch's jobs that have not ended; returns how many were
        canceled."""
        return int(self._request("DELETE", f"/v1/batches/{batch_id}").json()["canceled"])

    def image_bytes(self, image_id: str) -> bytes:
        """GET /v1/images/{image_id}: the PNG."""
        return self._request("GET", f"/v1/images/{image_id}").content

    def wait(self, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None) -> JobPublic:
        """Poll a job until it is finished, failed or canceled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.state.is_terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout_s} s")
            time.sleep(poll_s)

    def generate(
        self,
        request: GenerateRequest | None = None,
        *,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> GenerationResult:
        """Submit one job (a GenerateRequest or its fields), wait for it, and download its images."""
        if request is None:
            request = GenerateRequest(**fields)
        elif fields:
            raise TypeError("pass either a GenerateRequest or its fields, not both")
        accepted = self.submit(request, idempotency_key=idempotency_key)
        job = self.wait(accepted.job_id, timeout_s=timeout_s)
        if job.state is not JobState.finished:
            raise JobFailed(job)
        return GenerationResult(job=job, images=[self.image_bytes(r.image_id) for r in job.results])
