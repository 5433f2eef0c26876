"""Sampling a batch: the jobs' images in sampler calls of about FGS_CHUNK_TARGET_S, each step reported (progress,
fence, cancel flag, the watchdog's clock), a shared call that fails sampled again job by job so that only the job
at fault is charged, and between chunks a yield to another tenant's queued job."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable

from redis.exceptions import RedisError
from rq.timeouts import BaseTimeoutException

from fgs_common import telemetry
from fgs_common.exceptions import InvalidJob
from fgs_common.job_records import now_ts
from fgs_common.wire import JobState
from fgs_worker.cancel import queue_cancel_check
from fgs_worker.job_claim import BatchMember
from fgs_worker.job_inputs import load_inputs
from fgs_worker.job_results import end_job, fail_job, leave_batch, lost, record_failure, write_chunk
from fgs_worker.runtime import WorkerRuntime, current_host

log = logging.getLogger("fgs.worker.jobs")

Rows = list[tuple[BatchMember, int]]  # (member, image index) of each image of a sampler call

# Failures that are no job's own: the worker's time limit (RQ raises it into the running call) and Redis going
# away. They end the whole batch as before; sampling each job again alone would only repeat them.
_NOT_A_JOBS_FAULT = (BaseTimeoutException, RedisError)


class StepReporter:
    """The sampler's on_step for one chunk: the watchdog's clock, each job's progress (fenced) and cancel flag in
    one round trip, heartbeats; returns the rows still wanted when a job left the batch."""

    def __init__(self, runtime: WorkerRuntime, rows: Rows):
        self.runtime = runtime
        self.rows = rows
        self.members = list(dict.fromkeys(member for member, _ in rows))

    def __call__(self, step: int, steps_total: int) -> set[int] | None:
        runtime = self.runtime
        current_host().watchdog.step_done()
        live = [m for m in self.members if m.outcome is None]
        with runtime.redis.pipeline(transaction=False) as pipe:
            for member in live:
                runtime.records.queue_progress(pipe, member.job_id, member.owner, step=step, steps_total=steps_total)
                queue_cancel_check(pipe, runtime.keys.cancel(member.job_id))
            replies = pipe.execute()
        for member, written, canceled in zip(live, replies[0::2], replies[1::2], strict=True):
            if written != 1:
                lost(runtime, member)
            elif canceled:
                end_job(runtime, member, JobState.canceled, {"canceled": True})
        runtime.beat()
        if all(m.outcome is None for m in live):
            return None
        return {row for row, (member, _) in enumerate(self.rows) if member.outcome is None}


def sample_chunk(runtime: WorkerRuntime, rows: Rows) -> float:
    """One sampler call over `rows`; write the PNGs, then each member's results. Returns the seconds spent
    sampling. The sampler checks the inputs first (`check_inputs`): an input the model cannot take is an
    InvalidJob before any model work."""
    began = time.perf_counter()
    out = runtime.sampler(
        prompt=[m.request.prompt for m, _ in rows],
        class_index=[m.request.class_index for m, _ in rows],
        conditioning_images=[m.conditioning_image(i) for m, i in rows],
        seeds=[m.request.seed + i for m, i in rows],
        params=[m.params for m, _ in rows],
        classifier=rows[0][0].classifier,  # one classifier per shared batch (GenerateRequest.shared_batch_key)
        on_step=StepReporter(runtime, rows),
    )
    sampling_s = time.perf_counter() - began
    telemetry.observe(runtime.redis, runtime.keys.prefix, "batch_size", len(rows))
    write_chunk(runtime, rows, out)
    return sampling_s


def _fail_alone(runtime: WorkerRuntime, member: BatchMember) -> None:
    """The job failed with its sampler call to itself: keep the failure for RQ (its traceback without the frames,
    which hold the call's tensors, so the jobs still to run get that memory back) and record it now, so that it
    leaves the watchdog's care while the others go on."""
    kind, error, trace = sys.exc_info()
    traceback.clear_frames(trace)
    if member.outcome is not None:  # canceled or lost meanwhile: how it left the batch stands
        return
    record_failure(runtime, member, error)
    member.failure = (kind, error, trace)  # only once recorded: if recording raised, the batch's handler records it
    current_host().watchdog.release(member.job_id)


def sample_isolating_failures(runtime: WorkerRuntime, chunk: Rows) -> float:
    """One sampler call over `chunk`; when it fails, each job in it samples its rows again alone, and a job
    that fails alone fails (`_fail_alone`). Returns the seconds spent sampling."""
    began = time.perf_counter()
    members = list(dict.fromkeys(m for m, _ in chunk))
    results_before = {m: len(m.results) for m in members}
    try:
        return sample_chunk(runtime, chunk)
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
        # images the failed call reported before it broke are sampled again (their results replaced in the
        # record); a PNG it wrote that the rerun does not reproduce byte for byte stays in the tenant's store
        # unreferenced (a failure inside the write loop)
        del member.results[results_before[member] :]
        began = time.perf_counter()
        try:
            sample_chunk(runtime, [(m, i) for m, i in chunk if m is member])
        except _NOT_A_JOBS_FAULT:
            raise
        except Exception:
            _fail_alone(runtime, member)
        sampling_s += time.perf_counter() - began
    return sampling_s


def sample_batch(runtime: WorkerRuntime, members: list[BatchMember], should_yield: Callable[[], bool]) -> None:
    """Run every member's images in chunks of about FGS_CHUNK_TARGET_S (`runtime.chunk_images`); each member ends on
    its own. Between chunks, when `should_yield()`, the job leaves the worker (`yield_worker`) with its images."""
    model = runtime.model_info()
    for member in members:
        try:
            load_inputs(runtime, member, model)
        except InvalidJob as error:  # this job cannot succeed on any worker: fail it now, not the others
            fail_job(runtime, member, error)
    current_host().watchdog.step_done()  # set-up done (images, classifier load and check): steps get step deadlines
    # and the abandon clock starts with the step clock, so that a step stuck from the start is the watchdog's to
    # end (step_timeout, said as such), not RQ's abandon sweep's (a bare AbandonedJobError)
    runtime.beat(force=True)
    # a job that yielded before has its first images already (their results kept by its claim)
    rows = [(m, i) for m in members if m.outcome is None for i in range(len(m.results), m.request.num_images)]
    sampling_s, start = 0.0, 0
    while start < len(rows):
        # a shared batch (FGS_MAX_BATCH_IMAGES at most in all) stays one call; a lone job is cut to the time target
        size = runtime.chunk_images(members[0].params) if len(members) == 1 else runtime.settings.max_batch_images
        chunk = [(m, i) for m, i in rows[start : start + size] if m.outcome is None and m.failure is None]
        start += size
        if chunk:
            chunk_s = sample_isolating_failures(runtime, chunk)
            runtime.record_chunk(len(chunk), members[0].params, chunk_s)
            sampling_s += chunk_s
        if start < len(rows) and should_yield():
            yield_worker(runtime, members)
            break
    telemetry.observe(runtime.redis, runtime.keys.prefix, "sampling_seconds", sampling_s)
    for member in members:
        if member.outcome is None and member.failure is None:
            images = len(member.results)
            end_job(runtime, member, JobState.finished, {"images": images}, images_done=images)


def yield_worker(runtime: WorkerRuntime, members: list[BatchMember]) -> None:
    """Give the worker to another tenant: each member still running goes back to `queued` with its images so far
    (its record keeps them; `preempted_at` says when) and resumes after them when claimed again. RQ queues the job
    again at the end of its queue (a repeat, set up by fgs_worker.jobs), so the round robin serves the others
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
            leave_batch(runtime, member, {"preempted": len(member.results)})
        else:
            lost(runtime, member)
