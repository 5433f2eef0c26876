"""The enqueued function: run one generate job, with the queued jobs that can share its batch, and write their
images to the artifact store.

    run_generate_job(job_id)
      1. claim the job (queued -> running, atomically; a canceled job is never run)           fgs_worker.job_claim
      2. claim companions: queued jobs whose images can share the sampler call, up to FGS_MAX_BATCH_IMAGES images
         (fgs_worker.shared_batch), each with an owner token of its own                      fgs_worker.job_claim
      3. per job, load conditioning images and the classifier (resident LRU; a first load is checked in the
         sandbox first): a job that cannot run fails alone                                    fgs_worker.job_inputs
      4. sample in chunks of about FGS_CHUNK_TARGET_S (at most FGS_MAX_BATCH_IMAGES images); between steps each
         job's progress, fence and cancel flag are checked, and a canceled or lost job's images leave the batch
         while the others go on; between chunks a job yields to another tenant's queued job (back to `queued`
         with its images, resumed after them by RQ's repeat)                               fgs_worker.batch_sampling
      5. write each chunk's PNGs, then append their results to each record; mark each job finished (or canceled
         / failed) in one step, fenced by its own token                                       fgs_worker.job_results

Failures are told apart by type (fgs_common.exceptions): an InvalidJob (bad arguments that only the model can
see, a classifier that does not fit, an artifact gone for good) fails the job at once with its message;
anything else, a ValueError from inside torch included, is raised to RQ, which retries it with backoff
(FGS_JOB_RETRIES, FGS_RETRY_BACKOFF_S) and finally files the job in its failed-job registry. A job is charged
only for its own failure: when a shared sampler call fails, each job in it samples its images again alone, and
only those that fail alone are retried or failed, each with its own retries (the companions through
`WorkerHost.finish_companion`, which hands them to RQ after the worker's own job). Without that, one tenant's
classifier that breaks on a batch size would spend the retries of every job that shared its call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rq import get_current_job

from fgs_common.rq_adapter import repeat_at_end_of_queue
from fgs_worker.batch_sampling import sample_batch
from fgs_worker.job_claim import BatchMember, claim_companions, claim_job
from fgs_worker.job_results import record_failure
from fgs_worker.runtime import WorkerRuntime, current_host, current_runtime
from fgs_worker.shared_batch import ExcInfo
from fgs_worker.watchdog import WatchedJob, step_deadline_s


def _arm_watchdog(runtime: WorkerRuntime, members: list[BatchMember]) -> None:
    """Deadlines for the whole sampler call: the pixels of every image of every job in it."""
    width, height = runtime.sampler.image_size(members[0].params)
    images = min(sum(m.request.num_images for m in members), runtime.settings.max_batch_images)
    step_s = step_deadline_s(runtime.settings, images, width, height)
    watched = [WatchedJob(m.job_id, m.owner, m.retries_left) for m in members]
    host = current_host()
    host.watchdog.arm(watched, runtime.settings.job_setup_deadline_s + step_s, step_s, host.expire_executions)


def _settle_companions(runtime: WorkerRuntime, companions: list[BatchMember], batch_failure: ExcInfo | None = None):
    """Each companion to RQ on its own: how it left the batch, or its failure (its own, else the batch's), which
    RQ retries with the companion's own count or files as failed."""
    for member in companions:
        if member.outcome is None:
            current_host().finish_companion(member.job_id, exc_info=member.failure or batch_failure)
        else:
            current_host().finish_companion(member.job_id, result=member.outcome)


def _yield_check(runtime: WorkerRuntime, rq_job, members: list[BatchMember]) -> Callable[[], bool]:
    """Whether the job should leave the worker between chunks: another tenant's job is queued. Only a job running
    alone yields (a job with companions is small: it ends within a chunk or two anyway); RQ then runs it again
    (a repeat of its RQ job, queued at the end of its queue once this execution ends)."""

    def should_yield() -> bool:
        if len(members) != 1 or rq_job is None:
            return False
        if not current_host().others_waiting(rq_job.origin):
            return False
        repeat_at_end_of_queue(rq_job)
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
    record = runtime.records.read(job_id)
    if record is None:
        return {"skipped": "no job record"}
    retries_left = (rq_job.retries_left or 0) if rq_job is not None else 0
    leader = claim_job(runtime, record, retries_left, take_over=True)
    if leader is None:
        now = runtime.records.read(job_id, with_results=False)
        return {"skipped": f"job is {now.state.value if now is not None else None}"}
    # Beat now, not a heartbeat_s later: until the first beat RQ holds the job for the whole job timeout, so a
    # worker killed in its first second would leave the job stranded for an hour.
    runtime.beat(force=True)
    members = [leader]
    runtime.current_jobs = [(leader.job_id, leader.owner)]
    try:
        if rq_job is not None:
            members += claim_companions(runtime, leader, record, rq_job.origin)
        runtime.current_jobs = [(m.job_id, m.owner) for m in members]
        _arm_watchdog(runtime, members)
        sample_batch(runtime, members, _yield_check(runtime, rq_job, members))
    except Exception as error:
        failure = sys.exc_info()
        for member in members:
            if member.outcome is None and member.failure is None:  # a job that failed alone is recorded already
                record_failure(runtime, member, error)
        _settle_companions(runtime, members[1:], failure)
        if leader.outcome is None:
            raise
        return leader.outcome
    finally:
        current_host().watchdog.disarm()
    _settle_companions(runtime, members[1:])
    if leader.failure is not None and leader.outcome is None:
        raise leader.failure[1]  # RQ retries or fails the worker's own job, as for any exception
    return leader.outcome
