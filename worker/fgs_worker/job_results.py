"""Writing results: each image as a PNG with its metadata in the artifact store, the chunk's results appended to
each job's record (files first: a reported image is always on disk), and how each job leaves the batch
(finished, canceled, failed, put back for a retry, or lost to another worker), every write fenced by its owner
token."""

from __future__ import annotations

import io
import json
import math
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fgs_common import telemetry
from fgs_common.exceptions import InvalidJob
from fgs_common.job_records import now_ts
from fgs_common.rq_adapter import LOST
from fgs_common.wire import ErrorBody, ImageResult, JobState
from fgs_worker.job_claim import BatchMember
from fgs_worker.runtime import WorkerRuntime, current_host

PNG_METADATA_KEY = "fgs"


def png_with_metadata(image: Image.Image, parameters: dict) -> bytes:
    """PNG bytes with the generation parameters as a JSON text chunk under key 'fgs'."""
    info = PngInfo()
    info.add_text(PNG_METADATA_KEY, json.dumps(parameters, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def error_json(code: str, message: str) -> str:
    return ErrorBody(code=code, message=message[:4000]).model_dump_json()


def _json_safe(value: float | None) -> tuple[float | None, bool]:
    """(value, False), or (None, True) for NaN and infinities, which JSON cannot carry."""
    if value is None or math.isfinite(value):
        return value, False
    return None, True


def write_image(runtime: WorkerRuntime, member: BatchMember, i: int, out, position: int) -> ImageResult:
    """Image i of the member (at `position` of the sampler's output) as a PNG with its metadata."""
    request, seed = member.request, member.request.seed + i
    value, not_finite = _json_safe(out.criterion_values[position] if out.criterion_values is not None else None)
    probabilities = out.probabilities[position] if out.probabilities is not None else None
    predicted = max(range(len(probabilities)), key=probabilities.__getitem__) if probabilities else None
    ids = request.conditioning_image_ids
    parameters = {
        # the request as sent (every generation parameter), then what is this image's own
        **request.model_dump(mode="json", exclude={"conditioning_image_ids", "num_images", "seed"}),
        "seed": seed,
        "conditioning_image_id": ids[i] if len(ids) > 1 else (ids or [None])[0],
        "model": runtime.model_id,
        "criterion_value": value,
        "criterion_not_finite": not_finite,
    }
    image_id = runtime.store.put_image(member.tenant, png_with_metadata(out.images[position], parameters), "png")
    return ImageResult(
        image_id=image_id, seed=seed, criterion_value=value, criterion_not_finite=not_finite, predicted_class=predicted
    )


def write_chunk(runtime: WorkerRuntime, rows: list[tuple[BatchMember, int]], out) -> None:
    """The images of one sampler call over `rows` (member, image index): the PNGs, then each member's new results
    appended to its record (a job that left the batch after the last step gets no more images)."""
    written: dict[str, int] = {}
    reported = {member: len(member.results) for member, _ in rows}  # where each one's new results start
    for position, row in enumerate(out.rows):
        member, i = rows[row]
        if member.outcome is None:
            member.results.append(write_image(runtime, member, i, out, position))
            written[member.tenant] = written.get(member.tenant, 0) + 1
    # Files first, then the records: a reported image is always on disk.
    members = [m for m in reported if m.outcome is None]
    with runtime.redis.pipeline(transaction=False) as pipe:
        for member in members:
            start = reported[member]
            runtime.records.queue_progress(
                pipe,
                member.job_id,
                member.owner,
                results_from=start,
                results=member.results[start:],
                images_done=len(member.results),
            )
        replies = pipe.execute()
    for member, reply in zip(members, replies, strict=True):
        if reply != 1:
            lost(runtime, member)
    for tenant, count in written.items():
        telemetry.incr_counter(runtime.redis, runtime.keys.prefix, "images_generated", count, tenant=tenant)


def end_job(runtime: WorkerRuntime, member: BatchMember, state: JobState, outcome: dict | None, **fields: Any) -> None:
    """Move the member's record to a final `state`, fenced by its token. `outcome`: what RQ hears (None: the
    exception being raised)."""
    finished = now_ts()
    ended = runtime.records.transition(
        member.job_id, state, (JobState.running,), expect_owner=member.owner, finished_at=finished, **fields
    )
    if ended:
        telemetry.observe(
            runtime.redis, runtime.keys.prefix, "end_to_end_seconds", max(0.0, finished - member.created_at)
        )
    runtime.redis.delete(runtime.keys.cancel(member.job_id))
    leave_batch(runtime, member, outcome)


def leave_batch(runtime: WorkerRuntime, member: BatchMember, outcome: dict | None) -> None:
    member.outcome = outcome
    current_host().watchdog.release(member.job_id)


def fail_job(runtime: WorkerRuntime, member: BatchMember, error: InvalidJob) -> None:
    """The job cannot succeed on any worker: fail it now, with its message."""
    end_job(runtime, member, JobState.failed, {"failed": str(error)}, error=error_json(error.code, str(error)))


def record_failure(runtime: WorkerRuntime, member: BatchMember, error: Exception) -> None:
    """The record side of a failed sampler call, for one job still in it. An InvalidJob fails it for good (RQ
    then hears nothing more); anything else puts it back to `queued` while RQ has retries left for this job (RQ
    retries it), else fails it (RQ files it failed)."""
    if isinstance(error, InvalidJob):
        fail_job(runtime, member, error)
        return
    message = f"{type(error).__name__}: {error}"
    if member.retries_left:
        retrying = error_json("retrying", message)
        runtime.records.transition(
            member.job_id, JobState.queued, (JobState.running,), expect_owner=member.owner, error=retrying
        )
    else:
        end_job(runtime, member, JobState.failed, None, error=error_json("worker_error", message))


def lost(runtime: WorkerRuntime, member: BatchMember) -> None:
    """Another worker owns the job now (we were paused or cut off past the abandon time): leave it alone, in its
    record and in RQ (the `LOST` outcome ends only this worker's execution, fgs_common.rq_adapter)."""
    leave_batch(runtime, member, LOST)
