"""Cross-job batching: the queued jobs a worker claims beside the one RQ handed it, to fill one sampler call.

When a worker takes a job of n < FGS_MAX_BATCH_IMAGES images it also claims, without waiting, jobs already
queued whose images can share the call (the same `batch_key` in their records: GenerationParams.shared_batch_key
plus the classifier), up to FGS_MAX_BATCH_IMAGES images in all; a lone job starts at once.

- Fairness: candidates are read from the heads of the tenant queues and taken one per tenant in turn, starting
  after the job's own tenant (the worker's round robin), so one tenant's thousands of small jobs fill a batch no
  more than another tenant's one job does.
- Atomic and crash-safe: one Lua script (`RqWorker.claim_queued`, fgs_common.rq_adapter) removes each chosen
  job from its RQ queue and, in the same step, marks it started in RQ (status, worker, an execution in the queue's
  started-job registry). A job another worker took first is not ours; a worker killed at any point after the
  script leaves its companions to RQ's abandon sweep (retried with their own retry counts, or failed and then
  reconciled), exactly like the job RQ handed it.
- Each companion keeps its own RQ job: heartbeats, the watchdog's expiry, and at the end RQ's own success or
  failure handling (`settle`), except for a companion lost to another worker, whose RQ job is left to its new
  owner (only this worker's execution ends, `fgs_common.rq_adapter.LOST`): a job that failed alone
  (fgs_worker.batch_sampling samples each job of a failed shared call again on its own) is retried with its own
  retries.

The job records (claim, progress, fencing by owner token) are `fgs_worker.job_claim`'s business, as for any job.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rq import Queue
from rq.job import Job

from fgs_common.rq_adapter import Execution, RqWorker
from fgs_common.wire import JobState

log = logging.getLogger("fgs.worker.shared_batch")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def pick_round_robin(heads: list[list[tuple[str, str, int]]], batch_key: str, images: int) -> list[tuple[int, str]]:
    """(queue index, job id) of the jobs to claim: one per queue in turn, in queue order, while `images` last.

    `heads[q]` holds (job id, batch key, images) of the jobs at the head of queue q, oldest first, already
    filtered to queued records. A job that does not fit (another batch key, too many images) is passed over;
    it stays at the head of its queue for the next dequeue.
    """
    chosen: list[tuple[int, str]] = []
    cursors = [0] * len(heads)
    progress = True
    while images > 0 and progress:
        progress = False
        for q, head in enumerate(heads):
            while cursors[q] < len(head):
                job_id, key, count = head[cursors[q]]
                cursors[q] += 1
                if key == batch_key and count <= images:
                    chosen.append((q, job_id))
                    images -= count
                    progress = True
                    break
            if images <= 0:
                break
    return chosen


@dataclass
class Companion:
    """A job claimed beside the worker's own: its RQ job and execution, and how it ended (set by `finish`)."""

    job: Job
    queue: Queue
    execution: Execution
    result: Any = None
    exc_info: ExcInfo | None = None
    finished: bool = False


class SharedBatch:
    """One per worker (`FgsWorker.shared_batch`): claims companions, keeps their RQ executions, settles them. The
    RQ side of each (its start and end as an execution of this worker) is `RqWorker`'s (fgs_common.rq_adapter)."""

    def __init__(self, worker: RqWorker, records: Any):
        self.worker = worker
        self.records = records  # fgs_common.job_records.JobRecords
        self.companions: dict[str, Companion] = {}

    def claim(self, origin: str, batch_key: str, images: int) -> list[tuple[str, int]]:
        """Claim queued jobs of `batch_key` with up to `images` images in all; (job id, RQ retries left) each."""
        names = [queue.name for queue in self.worker.queues]
        if origin in names:  # start after the leader's tenant, end with it (round robin)
            cut = names.index(origin) + 1
            names = names[cut:] + names[:cut]
        queues = [self.worker.queue(name) for name in names]
        heads = self._heads(queues, images)
        chosen = pick_round_robin(heads, batch_key, images)
        if not chosen:
            return []
        claimed = []
        for job, queue, execution in self.worker.claim_queued([(queues[q], job_id) for q, job_id in chosen]):
            self.companions[job.id] = Companion(job, queue, execution)
            claimed.append((job.id, job.retries_left or 0))
        return claimed

    def _heads(self, queues: list[Queue], images: int) -> list[list[tuple[str, str, int]]]:
        """The first `images` jobs of each queue that are still queued in their records: (id, batch key, images)."""
        with self.worker.connection.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.lrange(queue.key, 0, images - 1)
            listed = [[i.decode() for i in ids] for ids in pipe.execute()]
        flat = [job_id for ids in listed for job_id in ids]
        if not flat:
            return [[] for _ in queues]
        fields = self.records.summaries(flat, "state", "batch_key", "images_total")
        heads = []
        for ids in listed:
            head = []
            for job_id in ids:
                state, key, total = fields[job_id]
                if state == JobState.queued.value and key:
                    head.append((job_id, key, int(total or 0)))
            heads.append(head)
        return heads

    def finish(self, job_id: str, result: Any = None, exc_info: ExcInfo | None = None) -> None:
        """How companion `job_id` ended for its record: a result (RQ files it finished; `LOST`, a job another
        worker took over, is left to that worker in RQ) or an exception (RQ retries it with its own retries left,
        or files it failed). RQ hears of it in `settle`."""
        companion = self.companions[job_id]
        companion.result, companion.exc_info, companion.finished = result, exc_info, True

    def settle(self) -> None:
        """RQ's own end of every companion (after the worker's job): success, or failure with its retry."""
        companions, self.companions = self.companions, {}
        for companion in companions.values():
            if companion.exc_info is None and not companion.finished:
                companion.exc_info = _exc_info(RuntimeError("the shared batch ended without reporting this job"))
            self.worker.finalize(
                companion.job, companion.queue, companion.execution, companion.result, companion.exc_info
            )

    def drop(self) -> list[Execution]:
        """Forget every companion without telling RQ (Redis went away): their executions, no longer heartbeated,
        are retried by the abandon sweep once Redis is back."""
        companions, self.companions = self.companions, {}
        for companion in companions.values():
            self.worker.forget_execution(companion.execution)
        return [c.execution for c in companions.values()]


def _exc_info(error: BaseException) -> ExcInfo:
    try:
        raise error
    except BaseException:
        return sys.exc_info()  # type: ignore[return-value]
