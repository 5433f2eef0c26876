"""The enqueued function: run one generate job and write its images to the artifact store.

    run_generate_job(job_id)
      1. claim the job (queued -> running, atomically; a canceled job is never run)
      2. load conditioning images and the classifier (resident LRU; a first load is checked in the sandbox first)
      3. sample in chunks of at most FGS_MAX_BATCH_IMAGES, writing each chunk's PNGs before reporting progress
      4. mark it finished (or canceled / failed) in one step

Failures are told apart by type (fgs_common.exceptions): an InvalidJob (bad arguments that only the model can
see, a classifier that does not fit, an artifact gone for good) fails the job at once with its message;
anything else, a ValueError from inside torch included, is raised to RQ, which retries it with backoff
(FGS_JOB_RETRIES, FGS_RETRY_BACKOFF_S) and finally files the job in its failed-job registry.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from rq import get_current_job

from fgs_classifier.registry import LoadedClassifier, load_classifier
from fgs_common import telemetry
from fgs_common.classifier_sandbox import run_classifier_check
from fgs_common.exceptions import ArtifactGone, InvalidClassifier, InvalidJob, JobCanceled, JobLost
from fgs_common.job_records import now_ts
from fgs_common.wire import STORED, ClassifierSpec, ErrorBody, GenerateRequest, ImageResult, JobState
from fgs_worker.cancel import cancel_requested
from fgs_worker.runtime import WorkerRuntime, current_runtime
from fgs_worker.watchdog import step_deadline_s

PNG_METADATA_KEY = "fgs"


def png_with_metadata(image: Image.Image, parameters: dict) -> bytes:
    """PNG bytes with the generation parameters as a JSON text chunk under key 'fgs'."""
    info = PngInfo()
    info.add_text(PNG_METADATA_KEY, json.dumps(parameters, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _error(code: str, message: str) -> str:
    return ErrorBody(code=code, message=message[:4000]).model_dump_json()


class _StepReporter:
    """The sampler's on_step: the watchdog's clock, progress into the record, cancel check, heartbeats."""

    def __init__(self, runtime: WorkerRuntime, job_id: str, owner: str):
        self.runtime = runtime
        self.job_id = job_id
        self.owner = owner
        self.cancel_key = runtime.keys.cancel(job_id)

    def __call__(self, step: int, steps_total: int) -> None:
        if self.runtime.watchdog is not None:
            self.runtime.watchdog.step_done()
        if not self.runtime.records.set_progress(self.job_id, self.owner, step=step, steps_total=steps_total):
            raise JobLost(self.job_id)
        self.runtime.beat()
        if cancel_requested(self.runtime.redis, self.cancel_key):
            raise JobCanceled(self.job_id)


def _load_classifier(runtime: WorkerRuntime, tenant: str, classifier_id: str) -> LoadedClassifier:
    folder = runtime.store.classifier_dir(tenant, classifier_id)
    if folder is None:
        raise ArtifactGone(
            f"classifier {classifier_id} is no longer in the artifact store (deleted by its tenant?): upload it again"
        )
    spec = ClassifierSpec.model_validate_json((folder / "spec.json").read_bytes())
    stats = folder / "hardness.safetensors"

    def load() -> LoadedClassifier:
        archive = runtime.store.classifier_archive(folder)
        stats_path = stats if stats.exists() else None
        # First load in this worker: run the archive in the sandbox before this process (the GPU, the Redis
        # connection) touches it. The API checked it too, unless it runs without torch (FGS_CLASSIFIER_CHECK).
        with tempfile.TemporaryDirectory(prefix="fgs-classifier-check-") as scratch:
            outcome = run_classifier_check(
                archive, folder / "spec.json", stats_path, runtime.settings, Path(scratch), on_wait=runtime.beat
            )
        if not outcome.ok:
            raise InvalidClassifier(outcome.message)
        return load_classifier(
            archive,
            spec,
            stats_path,
            device=runtime.device,
            max_unpacked_bytes=runtime.settings.max_classifier_unpacked_bytes,
        )

    return runtime.classifiers.get(f"{tenant}/{classifier_id}", load)


def _conditioning_images(runtime: WorkerRuntime, tenant: str, image_ids: list[str]) -> list[Image.Image]:
    loaded: dict[str, Image.Image] = {}
    for image_id in image_ids:
        if image_id not in loaded:
            path: Path | None = runtime.store.image_path(tenant, image_id)
            if path is None:
                raise ArtifactGone(f"conditioning image {image_id} is no longer in the artifact store")
            with Image.open(path) as image:
                loaded[image_id] = image.convert("RGB")
    return [loaded[i] for i in image_ids]


def _json_safe(value: float | None) -> tuple[float | None, bool]:
    """(value, False), or (None, True) for NaN and infinities, which JSON cannot carry."""
    if value is None or math.isfinite(value):
        return value, False
    return None, True


def _generate(
    runtime: WorkerRuntime, job_id: str, owner: str, tenant: str, request: GenerateRequest
) -> list[ImageResult]:
    settings, prefix = runtime.settings, runtime.keys.prefix
    images = _conditioning_images(runtime, tenant, request.conditioning_image_ids)
    classifier = _load_classifier(runtime, tenant, request.classifier_id) if request.classifier_id else None
    params = request.generation_params()
    width, height = runtime.sampler.image_size(params)
    limit = runtime.model_info().max_pixels_per_image
    if width * height > limit:
        raise InvalidJob(
            f"{width}x{height} = {width * height} pixels per image is more than this model takes "
            f"({limit}, see GET /v1/model)"
        )
    on_step = _StepReporter(runtime, job_id, owner)
    if runtime.watchdog is not None:
        runtime.watchdog.step_done()  # set-up done (images, classifier load and check): steps get step deadlines
    seeds = request.seeds()
    results: list[ImageResult] = []
    sampling_s = 0.0
    for start in range(0, len(seeds), settings.max_batch_images):
        chunk = seeds[start : start + settings.max_batch_images]
        began = time.perf_counter()
        out = runtime.sampler(
            prompt=request.prompt,
            class_index=request.class_index,
            conditioning_images=images if len(images) <= 1 else images[start : start + len(chunk)],
            seeds=chunk,
            params=params,
            classifier=classifier,
            on_step=on_step,
        )
        sampling_s += time.perf_counter() - began
        telemetry.observe(runtime.redis, prefix, "batch_size", len(chunk))
        for i, (seed, image) in enumerate(zip(chunk, out.images, strict=False)):
            value, not_finite = _json_safe(out.criterion_values[i] if out.criterion_values is not None else None)
            probabilities = out.probabilities[i] if out.probabilities is not None else None
            predicted = max(range(len(probabilities)), key=probabilities.__getitem__) if probabilities else None
            ids = request.conditioning_image_ids
            parameters = {
                # the request as sent (every generation parameter), then what is this image's own
                **request.model_dump(mode="json", exclude={"conditioning_image_ids", "num_images", "seed"}),
                "seed": seed,
                "conditioning_image_id": ids[start + i] if len(ids) > 1 else (ids or [None])[0],
                "model": runtime.model_id,
                "criterion_value": value,
                "criterion_not_finite": not_finite,
            }
            image_id = runtime.store.put_image(tenant, png_with_metadata(image, parameters), "png")
            results.append(
                ImageResult(
                    image_id=image_id,
                    seed=seed,
                    criterion_value=value,
                    criterion_not_finite=not_finite,
                    predicted_class=predicted,
                )
            )
        # Files first, then the record: a reported image is always on disk.
        reported = json.dumps([r.model_dump() for r in results])
        if not runtime.records.set_progress(job_id, owner, images_done=len(results), results=reported):
            raise JobLost(job_id)
        telemetry.incr_counter(runtime.redis, prefix, "images_generated", len(chunk), tenant=tenant)
    telemetry.observe(runtime.redis, prefix, "sampling_seconds", sampling_s)
    return results


def run_generate_job(job_id: str | None = None) -> dict:
    """Run job `job_id` (default: the current RQ job's id, which is the fgs job id).

    The request lives in the job record, not in the RQ job's arguments: big plans stay small in Redis.
    """
    if job_id is None:
        rq_job = get_current_job()
        if rq_job is None:
            raise RuntimeError("run_generate_job() without a job id runs only inside an RQ worker")
        job_id = rq_job.id
    runtime = current_runtime()
    records, prefix = runtime.records, runtime.keys.prefix
    raw = records.raw(job_id)
    if not raw:
        return {"skipped": "no job record"}
    tenant = raw["tenant"]
    request = GenerateRequest.model_validate_json(raw["request"], context=STORED)
    started = now_ts()
    # The fence: every later write of this attempt carries this token (fgs_common.job_records).
    owner = f"{runtime.name}:{uuid.uuid4().hex[:12]}"
    claim = dict(
        started_at=started,
        worker=runtime.name,
        owner=owner,
        step=0,
        steps_total=request.steps,
        images_done=0,
        results="[]",
        error="",
    )
    claimed = records.transition(job_id, JobState.running, (JobState.queued,), **claim)
    previous = raw.get("worker", "")
    if (
        not claimed
        and raw.get("state") == JobState.running.value
        and (previous == runtime.name or not runtime.redis.exists(runtime.keys.worker_alive(previous)))
    ):
        # RQ handed us a job whose worker died mid-run (its heartbeat expired), or that this worker dropped: take
        # it over, from that owner only, so that of two workers taking over the same job one wins.
        claimed = records.transition(
            job_id, JobState.running, (JobState.running,), expect_owner=raw.get("owner", ""), **claim
        )
    if not claimed:
        return {"skipped": f"job is {records.raw(job_id).get('state')}"}
    # Beat now, not a heartbeat_s later: until the first beat RQ holds the job for the whole job timeout, so a
    # worker killed in its first second would leave the job stranded for an hour.
    runtime.beat(force=True)
    telemetry.observe(runtime.redis, prefix, "queue_wait_seconds", max(0.0, started - float(raw["created_at"])))
    rq_job = get_current_job()
    runtime.current_job = (job_id, owner)
    if runtime.watchdog is not None:
        width, height = runtime.sampler.image_size(request)
        batch = min(request.num_images, runtime.settings.max_batch_images)
        step_s = step_deadline_s(runtime.settings, batch, width, height)
        retries_left = (rq_job.retries_left or 0) if rq_job is not None else 0
        runtime.watchdog.arm(
            job_id,
            owner,
            runtime.settings.job_setup_deadline_s + step_s,
            step_s,
            retries_left,
            runtime.expire_execution,
        )

    def end(state: JobState, **fields) -> None:
        finished = now_ts()
        if records.transition(job_id, state, (JobState.running,), expect_owner=owner, finished_at=finished, **fields):
            telemetry.observe(
                runtime.redis, prefix, "end_to_end_seconds", max(0.0, finished - float(raw["created_at"]))
            )
        runtime.redis.delete(runtime.keys.cancel(job_id))

    try:
        results = _generate(runtime, job_id, owner, tenant, request)
    except JobLost:
        # Another worker owns the job now (we were paused or cut off past the abandon time): leave it alone.
        return {"lost": True}
    except JobCanceled:
        end(JobState.canceled)
        return {"canceled": True}
    except InvalidJob as error:
        # the job cannot succeed on any worker: fail now, do not retry
        end(JobState.failed, error=_error(error.code, str(error)))
        return {"failed": str(error)}
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        if rq_job is not None and rq_job.retries_left:
            retrying = _error("retrying", message)
            records.transition(job_id, JobState.queued, (JobState.running,), expect_owner=owner, error=retrying)
        else:
            end(JobState.failed, error=_error("worker_error", message))
        raise
    finally:
        if runtime.watchdog is not None:
            runtime.watchdog.disarm()
    end(JobState.finished, images_done=len(results), results=json.dumps([r.model_dump() for r in results]))
    return {"images": len(results)}
