"""The enqueued function: run one generate job, with the queued jobs that can share its batch, and write their
images to the artifact store.

    run_generate_job(job_id)
      1. claim the job (queued -> running, atomically; a canceled job is never run)
      2. claim companions: queued jobs whose images can share the sampler call, up to FGS_MAX_BATCH_IMAGES images
         (fgs_worker.shared_batch), each with an owner token of its own
      3. per job, load conditioning images and the classifier (resident LRU; a first load is checked in the
         sandbox first) and check its inputs: a job that cannot run fails alone
      4. sample in chunks of about FGS_CHUNK_TARGET_S (at most FGS_MAX_BATCH_IMAGES images), writing each chunk's
         PNGs before reporting progress; between steps each job's progress, fence and cancel flag are checked,
         and a canceled or lost job's images leave the batch while the others go on; between chunks a job yields
         to another tenant's queued job (back to `queued` with its images, resumed after them by RQ's repeat)
      5. mark each job finished (or canceled / failed) in one step, fenced by its own token

Failures are told apart by type (fgs_common.exceptions): an InvalidJob (bad arguments that only the model can
see, a classifier that does not fit, an artifact gone for good) fails the job at once with its message;
anything else, a ValueError from inside torch included, is raised to RQ, which retries it with backoff
(FGS_JOB_RETRIES, FGS_RETRY_BACKOFF_S) and finally files the job in its failed-job registry. A job is charged
only for its own failure: when a shared sampler call fails, each job in it samples its images again alone, and
only those that fail alone are retried or failed, each with its own retries (the companions through
`runtime.companions.finish`, which hands them to RQ after the worker's own job). Without that, one tenant's
classifier that breaks on a batch size would spend the retries of every job that shared its call.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import BaseTimeoutException

from fgs_common import telemetry
from fgs_common.classifier_acceptance import checked_stored_copy, stored_classifier
from fgs_common.exceptions import ArtifactGone, InvalidJob
from fgs_common.job_records import now_ts
from fgs_common.wire import STORED, ErrorBody, GenerateRequest, GenerationParams, ImageResult, JobState
from fgs_worker.cancel import queue_cancel_check
from fgs_worker.confined_classifier import ConfinedClassifier
from fgs_worker.runtime import WorkerRuntime, current_runtime
from fgs_worker.shared_batch import ExcInfo
from fgs_worker.watchdog import WatchedJob, step_deadline_s

log = logging.getLogger("fgs.worker.jobs")

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


@dataclass(eq=False)  # compared and hashed by identity: one object per job of the batch
class _Member:
    """One job of the batch this worker runs: the fence of its record and what its images need."""

    job_id: str
    owner: str
    tenant: str
    request: GenerateRequest
    params: GenerationParams
    created_at: float
    retries_left: int  # RQ's, for this job alone
    conditioning: list[Image.Image] = field(default_factory=list)
    classifier: ConfinedClassifier | None = None
    results: list[ImageResult] = field(default_factory=list)
    outcome: dict | None = None  # how it left the batch (finished, canceled, failed, lost); None while it runs
    failure: ExcInfo | None = None  # its sampler call failed with it alone in it: RQ retries or fails it

    def conditioning_image(self, i: int) -> Image.Image | None:
        """Image i's conditioning image: none (text only), the job's one, or its i-th."""
        if not self.conditioning:
            return None
        return self.conditioning[i] if len(self.conditioning) > 1 else self.conditioning[0]


def _end(runtime: WorkerRuntime, member: _Member, state: JobState, outcome: dict | None, **fields: Any) -> None:
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
    _leave(runtime, member, outcome)


def _leave(runtime: WorkerRuntime, member: _Member, outcome: dict | None) -> None:
    member.outcome = outcome
    if runtime.watchdog is not None:
        runtime.watchdog.release(member.job_id)


def _record_failure(runtime: WorkerRuntime, member: _Member, error: Exception) -> None:
    """The record side of a failed sampler call, for one job still in it. An InvalidJob fails it for good (RQ
    then hears nothing more); anything else puts it back to `queued` while RQ has retries left for this job (RQ
    retries it), else fails it (RQ files it failed)."""
    if isinstance(error, InvalidJob):
        _end(runtime, member, JobState.failed, {"failed": str(error)}, error=_error(error.code, str(error)))
        return
    message = f"{type(error).__name__}: {error}"
    if member.retries_left:
        retrying = _error("retrying", message)
        runtime.records.transition(
            member.job_id, JobState.queued, (JobState.running,), expect_owner=member.owner, error=retrying
        )
    else:
        _end(runtime, member, JobState.failed, None, error=_error("worker_error", message))


def _lost(runtime: WorkerRuntime, member: _Member) -> None:
    """Another worker owns the job now (we were paused or cut off past the abandon time): leave it alone."""
    _leave(runtime, member, {"lost": True})


class _StepReporter:
    """The sampler's on_step for one chunk: the watchdog's clock, each job's progress (fenced) and cancel flag in
    one round trip, heartbeats; returns the rows still wanted when a job left the batch."""

    def __init__(self, runtime: WorkerRuntime, rows: list[tuple[_Member, int]]):
        self.runtime = runtime
        self.rows = rows
        self.members = list(dict.fromkeys(member for member, _ in rows))

    def __call__(self, step: int, steps_total: int) -> set[int] | None:
        runtime = self.runtime
        if runtime.watchdog is not None:
            runtime.watchdog.step_done()
        live = [m for m in self.members if m.outcome is None]
        with runtime.redis.pipeline(transaction=False) as pipe:
            for member in live:
                runtime.records.queue_progress(pipe, member.job_id, member.owner, step=step, steps_total=steps_total)
                queue_cancel_check(pipe, runtime.keys.cancel(member.job_id))
            replies = pipe.execute()
        for member, written, canceled in zip(live, replies[0::2], replies[1::2], strict=True):
            if written != 1:
                _lost(runtime, member)
            elif canceled:
                _end(runtime, member, JobState.canceled, {"canceled": True})
        runtime.beat()
        if all(m.outcome is None for m in live):
            return None
        return {row for row, (member, _) in enumerate(self.rows) if member.outcome is None}


def _load_classifier(runtime: WorkerRuntime, tenant: str, classifier_id: str) -> ConfinedClassifier:
    stored = stored_classifier(runtime.store, tenant, classifier_id)

    def load() -> ConfinedClassifier:
        # First load in this worker: the archive passes acceptance first (fgs_common.classifier_acceptance: a
        # private copy checked in the sandbox; the API checked it too, unless it runs without torch). Then its
        # confined process (fgs_worker.confined_classifier) loads it: this process never does. The child reads the
        # checked copy through an open file, which outlives the copy's folder, so what runs is what was checked.
        with checked_stored_copy(stored, runtime.settings, on_wait=runtime.beat) as checked:
            classifier = ConfinedClassifier(
                checked.archive, stored.spec, checked.stats, runtime.settings, on_wait=runtime.beat
            )
        try:
            classifier.start()
        except BaseException:
            classifier.close()
            raise
        return classifier

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


def _prepare(runtime: WorkerRuntime, member: _Member, limit: int) -> None:
    """Load what the member's images need and check its inputs; raise InvalidJob when it cannot run."""
    request = member.request
    member.conditioning = _conditioning_images(runtime, member.tenant, request.conditioning_image_ids)
    if request.classifier_id:
        member.classifier = _load_classifier(runtime, member.tenant, request.classifier_id)
    width, height = runtime.sampler.image_size(member.params)
    if width * height > limit:
        raise InvalidJob(
            f"{width}x{height} = {width * height} pixels per image is more than this model takes "
            f"({limit}, see GET /v1/model)"
        )
    runtime.sampler.check_inputs(
        prompt=request.prompt,
        class_index=request.class_index,
        conditioning_images=member.conditioning,
        seeds=request.seeds(),
        params=member.params,
        classifier=member.classifier,
    )


def _write_image(runtime: WorkerRuntime, member: _Member, i: int, out, position: int) -> ImageResult:
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


def _sample_chunk(runtime: WorkerRuntime, rows: list[tuple[_Member, int]]) -> float:
    """One sampler call over `rows` (member, image index); write the PNGs, then each member's progress.
    Returns the seconds spent sampling."""
    began = time.perf_counter()
    out = runtime.sampler(
        prompt=[m.request.prompt for m, _ in rows],
        class_index=[m.request.class_index for m, _ in rows],
        conditioning_images=[m.conditioning_image(i) for m, i in rows],
        seeds=[m.request.seed + i for m, i in rows],
        params=[m.params for m, _ in rows],
        classifier=rows[0][0].classifier,  # one classifier per shared batch (GenerateRequest.shared_batch_key)
        on_step=_StepReporter(runtime, rows),
    )
    sampling_s = time.perf_counter() - began
    prefix = runtime.keys.prefix
    telemetry.observe(runtime.redis, prefix, "batch_size", len(rows))
    written: dict[str, int] = {}
    for position, row in enumerate(out.rows):
        member, i = rows[row]
        if member.outcome is None:  # a job that left the batch after the last step gets no more images
            member.results.append(_write_image(runtime, member, i, out, position))
            written[member.tenant] = written.get(member.tenant, 0) + 1
    # Files first, then the records: a reported image is always on disk.
    members = [m for m in dict.fromkeys(m for m, _ in rows) if m.outcome is None]
    with runtime.redis.pipeline(transaction=False) as pipe:
        for member in members:
            reported = json.dumps([r.model_dump() for r in member.results])
            runtime.records.queue_progress(
                pipe, member.job_id, member.owner, images_done=len(member.results), results=reported
            )
        replies = pipe.execute()
    for member, reply in zip(members, replies, strict=True):
        if reply != 1:
            _lost(runtime, member)
    for tenant, count in written.items():
        telemetry.incr_counter(runtime.redis, prefix, "images_generated", count, tenant=tenant)
    return sampling_s


# Failures that are no job's own: the worker's time limit (RQ raises it into the running call) and Redis going
# away. They end the whole batch as before; sampling each job again alone would only repeat them.
_NOT_A_JOBS_FAULT = (BaseTimeoutException, RedisError)


def _fail_alone(runtime: WorkerRuntime, member: _Member) -> None:
    """The job failed with its sampler call to itself: keep the failure for RQ (its traceback without the frames,
    which hold the call's tensors, so the jobs still to run get that memory back) and record it now, so that it
    leaves the watchdog's care while the others go on."""
    kind, error, trace = sys.exc_info()
    traceback.clear_frames(trace)
    if member.outcome is not None:  # canceled or lost meanwhile: how it left the batch stands
        return
    _record_failure(runtime, member, error)
    member.failure = (kind, error, trace)  # only once recorded: if recording raised, the batch's handler records it
    if runtime.watchdog is not None:
        runtime.watchdog.release(member.job_id)


def _sample_isolating_failures(runtime: WorkerRuntime, chunk: list[tuple[_Member, int]]) -> float:
    """One sampler call over `chunk`; when it fails, each job in it samples its rows again alone, and a job
    that fails alone fails (`_fail_alone`). Returns the seconds spent sampling."""
    began = time.perf_counter()
    members = list(dict.fromkeys(m for m, _ in chunk))
    results_before = {m: len(m.results) for m in members}
    try:
        return _sample_chunk(runtime, chunk)
    except _NOT_A_JOBS_FAULT:
        raise
    except Exception as error:
        if len(members) == 1:
            _fail_alone(runtime, members[0])
            return time.perf_counter() - began
        log.warning(
            "a sampler call shared by %d jobs failed (%s: %s); sampling each job alone so only the job at fault"
            " is charged",
            len(members),
            type(error).__name__,
            str(error)[:200],
        )
    sampling_s = time.perf_counter() - began
    for member in members:
        if member.outcome is not None:  # canceled or lost during the shared call
            continue
        # images the failed call reported before it broke are sampled again; a PNG it wrote that the rerun does
        # not reproduce byte for byte stays in the tenant's store unreferenced (a failure inside the write loop)
        del member.results[results_before[member] :]
        began = time.perf_counter()
        try:
            _sample_chunk(runtime, [(m, i) for m, i in chunk if m is member])
        except _NOT_A_JOBS_FAULT:
            raise
        except Exception:
            _fail_alone(runtime, member)
        sampling_s += time.perf_counter() - began
    return sampling_s


def _generate(runtime: WorkerRuntime, members: list[_Member], should_yield: Callable[[], bool]) -> None:
    """Run every member's images in chunks of about FGS_CHUNK_TARGET_S (`runtime.chunk_images`); each member ends on
    its own. Between chunks, when `should_yield()`, the job leaves the worker (`_yield`) with its images so far."""
    limit = runtime.model_info().max_pixels_per_image
    for member in members:
        try:
            _prepare(runtime, member, limit)
        except InvalidJob as error:  # this job cannot succeed on any worker: fail it now, not the others
            _end(runtime, member, JobState.failed, {"failed": str(error)}, error=_error(error.code, str(error)))
    if runtime.watchdog is not None:
        runtime.watchdog.step_done()  # set-up done (images, classifier load and check): steps get step deadlines
        # and the abandon clock starts with the step clock, so that a step stuck from the start is the
        # watchdog's to end (step_timeout, said as such), not RQ's abandon sweep's (a bare AbandonedJobError)
        runtime.beat(force=True)
    # a job that yielded before has its first images already (their results kept by `_claim`)
    rows = [(m, i) for m in members if m.outcome is None for i in range(len(m.results), m.request.num_images)]
    sampling_s, start = 0.0, 0
    while start < len(rows):
        # a shared batch (FGS_MAX_BATCH_IMAGES at most in all) stays one call; a lone job is cut to the time target
        size = runtime.chunk_images(members[0].params) if len(members) == 1 else runtime.settings.max_batch_images
        chunk = [(m, i) for m, i in rows[start : start + size] if m.outcome is None and m.failure is None]
        start += size
        if chunk:
            chunk_s = _sample_isolating_failures(runtime, chunk)
            runtime.record_chunk(len(chunk), members[0].params, chunk_s)
            sampling_s += chunk_s
        if start < len(rows) and should_yield():
            _yield(runtime, members)
            break
    telemetry.observe(runtime.redis, runtime.keys.prefix, "sampling_seconds", sampling_s)
    for member in members:
        if member.outcome is None and member.failure is None:
            results = json.dumps([r.model_dump() for r in member.results])
            images = len(member.results)
            _end(runtime, member, JobState.finished, {"images": images}, images_done=images, results=results)


def _yield(runtime: WorkerRuntime, members: list[_Member]) -> None:
    """Give the worker to another tenant: each member still running goes back to `queued` with its images so far
    (its record keeps them; `preempted_at` says when) and resumes after them when claimed again. RQ queues the job
    again at the end of its queue (a repeat, set up by run_generate_job), so the round robin serves the others
    first."""
    for member in members:
        if member.outcome is not None or member.failure is not None:
            continue
        if runtime.records.transition(
            member.job_id,
            JobState.queued,
            (JobState.running,),
            expect_owner=member.owner,
            resume="1",
            preempted_at=now_ts(),
        ):
            _leave(runtime, member, {"preempted": len(member.results)})
        else:
            _lost(runtime, member)


def _claim(runtime: WorkerRuntime, job_id: str, raw: dict[str, str], retries_left: int, take_over: bool):
    """Claim the job's record for this worker (queued -> running) with an owner token of its own; with
    `take_over`, also a running job whose worker died. The _Member, or None when the job is not ours to run."""
    request = GenerateRequest.model_validate_json(raw["request"], context=STORED)
    started = now_ts()
    # The fence: every later write of this attempt carries this token (fgs_common.job_records).
    owner = f"{runtime.name}:{uuid.uuid4().hex[:12]}"
    # A job that yielded (`_yield`: field `resume`) resumes after the images it has; any other starts over.
    results = (raw.get("results") or "[]") if raw.get("resume") == "1" else "[]"
    claim = dict(
        started_at=started,
        worker=runtime.name,
        owner=owner,
        step=0,
        steps_total=request.steps,
        images_done=len(json.loads(results)),
        results=results,
        resume="",
        error="",
    )
    records = runtime.records
    claimed = records.transition(job_id, JobState.running, (JobState.queued,), **claim)
    previous = raw.get("worker", "")
    if (
        not claimed
        and take_over
        and raw.get("state") == JobState.running.value
        and (previous == runtime.name or not runtime.redis.exists(runtime.keys.worker_alive(previous)))
    ):
        # RQ handed us a job whose worker died mid-run (its heartbeat expired), or that this worker dropped: take
        # it over, from that owner only, so that of two workers taking over the same job one wins.
        claimed = records.transition(
            job_id, JobState.running, (JobState.running,), expect_owner=raw.get("owner", ""), **claim
        )
    if not claimed:
        return None
    created = float(raw["created_at"])
    telemetry.observe(runtime.redis, runtime.keys.prefix, "queue_wait_seconds", max(0.0, started - created))
    params = request.generation_params()
    member = _Member(job_id, owner, raw["tenant"], request, params, created, retries_left)
    member.results = [ImageResult.model_validate(result) for result in json.loads(results)]
    return member


def _claim_companions(runtime: WorkerRuntime, leader: _Member, raw: dict[str, str], rq_job) -> list[_Member]:
    """Queued jobs that share the leader's sampler call (fgs_worker.shared_batch), their records claimed."""
    images = runtime.settings.max_batch_images - leader.request.num_images
    companions = runtime.companions
    if images <= 0 or not runtime.settings.batch_across_jobs or companions is None or rq_job is None:
        return []
    if not raw.get("batch_key"):  # a record written before shared batches: runs alone
        return []
    members = []
    for job_id, retries_left in companions.claim(rq_job.origin, raw["batch_key"], images):
        companion_raw = runtime.records.raw(job_id)
        member = _claim(runtime, job_id, companion_raw, retries_left, take_over=False) if companion_raw else None
        if member is None:  # canceled (or expired) between the look at the queue and the claim
            companions.finish(job_id, result={"skipped": "job is no longer queued"})
        else:
            members.append(member)
    return members


def _arm_watchdog(runtime: WorkerRuntime, members: list[_Member]) -> None:
    """Deadlines for the whole sampler call: the pixels of every image of every job in it."""
    width, height = runtime.sampler.image_size(members[0].params)
    images = min(sum(m.request.num_images for m in members), runtime.settings.max_batch_images)
    step_s = step_deadline_s(runtime.settings, images, width, height)
    watched = [WatchedJob(m.job_id, m.owner, m.retries_left) for m in members]
    runtime.watchdog.arm(watched, runtime.settings.job_setup_deadline_s + step_s, step_s, runtime.expire_execution)


def _settle_companions(runtime: WorkerRuntime, companions: list[_Member], batch_failure: ExcInfo | None = None):
    """Each companion to RQ on its own: how it left the batch, or its failure (its own, else the batch's), which
    RQ retries with the companion's own count or files as failed."""
    for member in companions:
        if member.outcome is None:
            runtime.companions.finish(member.job_id, exc_info=member.failure or batch_failure)
        else:
            runtime.companions.finish(member.job_id, result=member.outcome)


def _yield_check(runtime: WorkerRuntime, rq_job, members: list[_Member]) -> Callable[[], bool]:
    """Whether the job should leave the worker between chunks: another tenant's job is queued. Only a job running
    alone yields (a job with companions is small: it ends within a chunk or two anyway); RQ then runs it again
    (a repeat of its RQ job, queued at the end of its queue once this execution ends)."""

    def should_yield() -> bool:
        if len(members) != 1 or rq_job is None or runtime.others_waiting is None:
            return False
        if not runtime.others_waiting(rq_job.origin):
            return False
        rq_job.repeats_left, rq_job.repeat_intervals = 1, [0]
        return True

    return should_yield


def run_generate_job(job_id: str | None = None) -> dict:
    """Run job `job_id` (default: the current RQ job's id, which is the fgs job id) and its companions.

    The request lives in the job record, not in the RQ job's arguments: big plans stay small in Redis.
    """
    rq_job = get_current_job()
    if job_id is None:
        if rq_job is None:
            raise RuntimeError("run_generate_job() without a job id runs only inside an RQ worker")
        job_id = rq_job.id
    runtime = current_runtime()
    raw = runtime.records.raw(job_id)
    if not raw:
        return {"skipped": "no job record"}
    retries_left = (rq_job.retries_left or 0) if rq_job is not None else 0
    leader = _claim(runtime, job_id, raw, retries_left, take_over=True)
    if leader is None:
        return {"skipped": f"job is {runtime.records.raw(job_id).get('state')}"}
    # Beat now, not a heartbeat_s later: until the first beat RQ holds the job for the whole job timeout, so a
    # worker killed in its first second would leave the job stranded for an hour.
    runtime.beat(force=True)
    members = [leader]
    runtime.current_jobs = [(leader.job_id, leader.owner)]
    try:
        members += _claim_companions(runtime, leader, raw, rq_job)
        runtime.current_jobs = [(m.job_id, m.owner) for m in members]
        if runtime.watchdog is not None:
            _arm_watchdog(runtime, members)
        _generate(runtime, members, _yield_check(runtime, rq_job, members))
    except Exception as error:
        failure = sys.exc_info()
        for member in members:
            if member.outcome is None and member.failure is None:  # a job that failed alone is recorded already
                _record_failure(runtime, member, error)
        _settle_companions(runtime, members[1:], failure)
        if leader.outcome is None:
            raise
        return leader.outcome
    finally:
        if runtime.watchdog is not None:
            runtime.watchdog.disarm()
    _settle_companions(runtime, members[1:])
    if leader.failure is not None and leader.outcome is None:
        raise leader.failure[1]  # RQ retries or fails the worker's own job, as for any exception
    return leader.outcome
