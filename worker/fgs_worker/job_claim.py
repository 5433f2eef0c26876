"""Claiming a batch: the job RQ handed the worker and the queued jobs that share its sampler call, each record
moved queued -> running with an owner token of its own (the fence of every later write, fgs_common.job_records).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from PIL import Image

from fgs_common import telemetry
from fgs_common.job_record import JobRecord
from fgs_common.job_records import now_ts
from fgs_common.wire import GenerateRequest, GenerationParams, ImageResult, JobState
from fgs_worker.confined_classifier import ConfinedClassifier
from fgs_worker.runtime import WorkerRuntime, current_host
from fgs_worker.shared_batch import ExcInfo


@dataclass(eq=False)  # compared and hashed by identity: one object per job of the batch
class BatchMember:
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
    results: list[ImageResult] = field(default_factory=list)  # as its record holds them
    outcome: dict | None = None  # how it left the batch (finished, canceled, failed, lost); None while it runs
    failure: ExcInfo | None = None  # its sampler call failed with it alone in it: RQ retries or fails it

    def conditioning_image(self, i: int) -> Image.Image | None:
        """Image i's conditioning image: none (text only), the job's one, or its i-th."""
        if not self.conditioning:
            return None
        return self.conditioning[i] if len(self.conditioning) > 1 else self.conditioning[0]


def claim_job(runtime: WorkerRuntime, record: JobRecord, retries_left: int, take_over: bool) -> BatchMember | None:
    """Claim the job's record for this worker (queued -> running) with an owner token of its own; with
    `take_over`, also a running job whose worker died. The BatchMember, or None when the job is not ours to run."""
    started = now_ts()
    # The fence: every later write of this attempt carries this token (fgs_common.job_records).
    owner = f"{runtime.name}:{uuid.uuid4().hex[:12]}"
    # A job that yielded (fgs_worker.batch_sampling: `resume`) resumes after the images it has; any other starts
    # over, its results list emptied in the claim's own step.
    results = list(record.results or ()) if record.resume else []
    claim = dict(
        started_at=started,
        worker=runtime.name,
        owner=owner,
        step=0,
        steps_total=record.request.steps,
        images_done=len(results),
        resume="",
        error="",
    )
    records, job_id = runtime.records, record.job_id
    claimed = records.transition(job_id, JobState.running, (JobState.queued,), clear_results=not record.resume, **claim)
    previous = record.worker
    if (
        not claimed
        and take_over
        and record.state is JobState.running
        and (previous == runtime.name or not runtime.redis.exists(runtime.keys.worker_alive(previous)))
    ):
        # RQ handed us a job whose worker died mid-run (its heartbeat expired), or that this worker dropped: take
        # it over, from that owner only, so that of two workers taking over the same job one wins.
        claimed = records.transition(
            job_id, JobState.running, (JobState.running,), expect_owner=record.owner, clear_results=True, **claim
        )  # a running record has no `resume`: it starts over
    if not claimed:
        return None
    if results:
        # A job paused by a version that kept its results in the job hash has none in its list: moved there, or
        # the chunks written from now on would hide them.
        records.adopt_earlier_results(job_id, owner, results)
    created = record.created_at or started
    telemetry.observe(runtime.redis, runtime.keys.prefix, "queue_wait_seconds", max(0.0, started - created))
    params = record.request.generation_params()
    member = BatchMember(job_id, owner, record.tenant, record.request, params, created, retries_left)
    member.results = results
    return member


def claim_companions(runtime: WorkerRuntime, leader: BatchMember, record: JobRecord, origin: str) -> list[BatchMember]:
    """Queued jobs that share the leader's sampler call (fgs_worker.shared_batch) from the tenant queues after
    `origin` (the leader's), their records claimed."""
    images = runtime.settings.max_batch_images - leader.request.num_images
    if images <= 0 or not runtime.settings.batch_across_jobs or not record.batch_key:
        return []
    members = []
    for job_id, retries_left in current_host().claim_companions(origin, record.batch_key, images):
        companion = runtime.records.read(job_id)
        member = claim_job(runtime, companion, retries_left, take_over=False) if companion is not None else None
        if member is None:  # canceled (or expired) between the look at the queue and the claim
            current_host().finish_companion(job_id, result={"skipped": "job is no longer queued"})
        else:
            members.append(member)
    return members
