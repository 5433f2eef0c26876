"""The worker process: load the model once, then take jobs from every tenant's queue in turn.

`FgsWorker` is an RQ SimpleWorker (no fork per job: the resident model and CUDA context survive between
jobs) that
- rediscovers tenant queues while idle (a tenant's queue appears with its first job),
- serves them round-robin, starting after the tenant it served last, so a tenant with a million queued images
  cannot starve one with ten; a job of many chunks yields between them when another tenant's job is queued
  (fgs_worker.jobs, FGS_CHUNK_TARGET_S), so one large job holds the worker for about one chunk,
- fills the sampler call of a small job with queued jobs that can share it (fgs_worker.shared_batch), each kept
  as an RQ job of its own (heartbeats, expiry, success or retry),
- moves due retries (RQ's scheduled-job registry, for retry backoff) back into their queues,
- heartbeats while it samples (RQ's own heartbeats only run between jobs in a SimpleWorker), so that the job
  of a worker that was killed is retried elsewhere after FGS_ABANDONED_AFTER_S,
- on SIGTERM stops taking work and finishes the job in hand (RQ's warm shutdown); a second signal stops at once,
- survives Redis outages: every Redis error in its loop waits for Redis with capped backoff and carries on,
  with the model still resident (a job cut off by the outage goes back to the queue),
- moves jobs that RQ gave up on (failed registry) to `failed` in their records (`reconcile_failed_jobs`),
- runs a watchdog thread (fgs_worker.watchdog) that ends the process when a step is stuck.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, WorkerStatus

from fgs_common.atomic_files import write_atomic
from fgs_common.classifier_sandbox import sweep_check_scratch
from fgs_common.job_records import ACTIVE_STATES, now_ts
from fgs_common.settings import Settings, get_settings
from fgs_common.wire import ErrorBody, JobState
from fgs_worker.runtime import WorkerRuntime, reset_current_runtime, set_current_runtime
from fgs_worker.shared_batch import SharedBatch
from fgs_worker.watchdog import JobWatchdog

log = logging.getLogger("fgs.worker")

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
# Waits between attempts to reach Redis again: capped, so a worker is back within seconds of Redis.
REDIS_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
# An idle worker looks at its queues this often: a new job waits at most 50 ms for it, and an idle worker
# sends Redis 20 small scripts a second (a single Redis serves ~100,000).
IDLE_POLL_S = 0.05

# Take the first job of the first non-empty queue (KEYS: the queues in serving order, then their intermediate
# lists) by moving it to that queue's intermediate list, RQ's own write-ahead place for a job in hand (rq
# IntermediateQueue). A plain LPOP, as RQ uses for several queues, loses the job if the worker dies before
# RQ registers the execution: the 30-minute soak lost one that way. From the intermediate list it is taken
# out once the execution is registered, or put back by `requeue_jobs_lost_in_hand`.
_TAKE_JOB = """
local n = #KEYS / 2
for i = 1, n do
  local job_id = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
  if job_id then return {KEYS[i], job_id} end
end
return false
"""
# A job stays in an intermediate list for the milliseconds between taking it and registering its execution.
# Seen there twice this far apart, its worker died in between. Below RQ's own rule for these lists (one minute,
# then the job counts as failed and spends a retry), and our sweep runs before RQ's in each maintenance pass.
LOST_IN_HAND_S = 20.0
# Put a job lost in hand back at the front of its queue, in one step (LREM, then a crash, would lose it again).
# KEYS: intermediate list, queue; ARGV: job id.
_PUT_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""
# Move a due retry back into its queue in one step (ZREM alone, then a crash, would drop the retry).
# KEYS: scheduled registry, queue, job hash; ARGV: job id.
_REQUEUE_DUE_RETRY = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 or redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('HSET', KEYS[3], 'status', 'queued')
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


class FgsWorker(SimpleWorker):
    """A non-forking RQ worker over all tenant queues, round-robin.

    Written against RQ 3.0 and pinned to that minor (pyproject.toml): `dequeue_job_and_maintain_ttl`,
    `execute_job`, `prepare_job_execution`, `_ordered_queues`, `reorder_queues`, the intermediate lists and the
    execution heartbeat are RQ internals that a new minor may change. Rerun tests/test_worker_*.py before moving
    the pin.
    """

    def __init__(self, runtime: WorkerRuntime, watchdog: bool = True):
        self.runtime = runtime
        self._last_served: str | None = None
        idle = Queue(f"{runtime.keys.prefix}:_none", connection=runtime.rq_redis, serializer=JSONSerializer)
        # Maintenance includes RQ's sweep for abandoned jobs (a started job whose heartbeat expired): run it as
        # often as a job can be abandoned, so a killed worker's job is retried within ~2x abandoned_after_s.
        super().__init__(
            [idle],
            name=runtime.name,
            connection=runtime.rq_redis,
            serializer=JSONSerializer,
            maintenance_interval=runtime.settings.abandoned_after_s,
        )
        self._take_job_script = self.connection.register_script(_TAKE_JOB)
        self._requeue_due_retry = self.connection.register_script(_REQUEUE_DUE_RETRY)
        self._put_back = self.connection.register_script(_PUT_BACK)
        runtime.on_heartbeat = self._rq_heartbeat
        runtime.expire_execution = self._expire_execution
        runtime.companions = SharedBatch(self, runtime.records)
        runtime.others_waiting = self._others_waiting
        if watchdog:
            runtime.watchdog = JobWatchdog(runtime.settings, runtime.records, runtime.redis, runtime.keys.cancel)

    # ---- Redis outages ----
    def _wait_for_redis(self, error: Exception) -> None:
        """Log, then wait until Redis answers again (capped backoff). The model stays resident."""
        log.error("worker %s: Redis unavailable (%s: %s); waiting for it", self.name, type(error).__name__, error)
        attempt = 0
        while not self._stop_requested:
            time.sleep(REDIS_BACKOFF_S[min(attempt, len(REDIS_BACKOFF_S) - 1)])
            attempt += 1
            try:
                self.connection.ping()
                self.runtime.redis.ping()
            except REDIS_DOWN:
                continue
            log.info("worker %s: Redis is back after %d attempts", self.name, attempt)
            return
        raise StopRequested()

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except REDIS_DOWN as error:
            self._wait_for_redis(error)

    def run_maintenance_tasks(self):
        try:
            # the tenant queues first: at start-up RQ knows only the idle queue, and the first pass is the one
            # that retries a job this process was working on when its watchdog ended it
            self._refresh_queues()
            self.runtime.publish_model_info()  # again after a Redis that lost it (no AOF) comes back
            self.requeue_jobs_lost_in_hand()
            super().run_maintenance_tasks()
            self.reconcile_failed_jobs()
        except REDIS_DOWN as error:
            self._wait_for_redis(error)

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline=pipeline)
        try:
            return super().heartbeat(timeout)
        except REDIS_DOWN as error:
            self._wait_for_redis(error)

    # ---- RQ's verdicts into our records ----
    def reconcile_failed_jobs(self) -> int:
        """Move the records of jobs RQ filed as failed (abandoned with no retries left, or failed outside our
        function) from queued/running to `failed`, with counters. Looks at each queue's failed registry from
        where the last pass stopped (its scores only grow: expiry = failure time + failure TTL)."""
        moved = 0
        for queue in self.queues:
            registry = FailedJobRegistry(queue.name, connection=self.connection, serializer=JSONSerializer)
            mark_key = f"{self.runtime.keys.prefix}:reconciled:{queue.name}"
            since = float(self.connection.get(mark_key) or 0)
            entries = self.connection.zrangebyscore(registry.key, since, "+inf", withscores=True)
            for member, score in entries:
                job_id = member.decode() if isinstance(member, bytes) else member
                moved += self._reconcile(job_id)
                since = max(since, score)
            if entries:
                self.connection.set(mark_key, since)
        return moved

    def _reconcile(self, job_id: str) -> int:
        records = self.runtime.records
        if records.redis.hget(records.keys.job(job_id), "state") not in {s.value for s in ACTIVE_STATES}:
            return 0
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except Exception:  # RQ's job hash is gone: its failure is all we know
            job = None
        if job is not None and job.get_status(refresh=False) != JobStatus.FAILED:
            return 0  # retried since: it is RQ's again
        reason = ((job.exc_info if job is not None else None) or "the worker stopped without reporting").strip()
        error = ErrorBody(code="worker_failed", message=reason.splitlines()[-1][:2000]).model_dump_json()
        return int(records.transition(job_id, JobState.failed, ACTIVE_STATES, error=error, finished_at=now_ts()))

    def _running(self) -> list[tuple[Execution, Job]]:
        """The executions this worker runs (its job's and its companions', fgs_worker.shared_batch) and their jobs."""
        running = []
        for execution in list(self.executions.values()):
            if execution._job is None:
                execution._job = Job.fetch(execution.job_id, connection=self.connection, serializer=JSONSerializer)
            running.append((execution, execution._job))
        return running

    def _expire_execution(self) -> None:
        """Score the running executions as expired in their started-job registries: the next abandon sweep (this
        worker's restart, or any worker's maintenance) retries or fails each at once. Called by the watchdog."""
        for execution, job in self._running():
            self.connection.zadd(job.started_job_registry.key, {execution.composite_key: 1}, xx=True)

    # ---- queues ----
    def _refresh_queues(self) -> None:
        names = sorted(self.runtime.redis.smembers(self.runtime.keys.tenant_queues()))
        if not names:
            return
        if self._last_served in names:  # start after the tenant served last
            cut = names.index(self._last_served) + 1
            names = names[cut:] + names[:cut]
        self.queues = [Queue(n, connection=self.connection, serializer=JSONSerializer) for n in names]
        self._ordered_queues = self.queues[:]

    def _others_waiting(self, queue_name: str) -> bool:
        """Whether a tenant queue other than `queue_name` holds a job (every tenant queue, also those that appeared
        since this job started): the running job then yields at its next chunk boundary (fgs_worker.jobs)."""
        names = self.runtime.redis.smembers(self.runtime.keys.tenant_queues())
        others = [Queue(n, connection=self.connection, serializer=JSONSerializer) for n in names if n != queue_name]
        if not others:
            return False
        with self.connection.pipeline(transaction=False) as pipe:
            for queue in others:
                pipe.llen(queue.key)
            return any(pipe.execute())

    def reorder_queues(self, reference_queue: Queue) -> None:
        self._last_served = reference_queue.name

    def _enqueue_due_retries(self) -> None:
        """Retries with backoff wait in each queue's scheduled registry; move the due ones back."""
        for queue in self.queues:
            registry = queue.scheduled_job_registry
            for job_id in registry.get_jobs_to_schedule():
                # one script decides which worker moves it, when several look at once
                keys = [registry.key, queue.key, Job.key_for(job_id)]
                if not self._requeue_due_retry(keys=keys, args=[job_id]):
                    log.warning("retry of job %s dropped: moved by another worker, or the job is gone", job_id)

    def requeue_jobs_lost_in_hand(self) -> int:
        """Put back the jobs a worker took (intermediate list) but died before registering: seen there without an
        execution twice, LOST_IN_HAND_S apart. The job never ran, so it costs no retry (and if it had, the
        record's owner fencing lets only one run write)."""
        moved = 0
        for queue in self.queues:
            intermediate = queue.intermediate_queue
            for job_id in intermediate.get_job_ids():
                if job_id in queue.started_job_registry:
                    continue
                seen_key = f"{self.runtime.keys.prefix}:in-hand-seen:{job_id}"
                first_seen = self.connection.get(seen_key)
                if first_seen is None:
                    self.connection.set(seen_key, time.time(), ex=int(10 * LOST_IN_HAND_S))
                elif time.time() - float(first_seen) >= min(
                    LOST_IN_HAND_S, self.runtime.settings.abandoned_after_s
                ) and self._put_back(keys=[intermediate.key, queue.key], args=[job_id]):
                    # at the front of its queue: it has waited its turn already
                    self.connection.delete(seen_key)
                    log.warning("job %s put back in %s: its worker died before starting it", job_id, queue.name)
                    moved += 1
        return moved

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # every job we take passes through its queue's intermediate list (_TAKE_JOB); RQ removes it from there
        # only for single-queue workers
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def _take_job(self, timeout_s: float) -> tuple[Job, Queue] | None:
        """The first job of the first non-empty queue in serving order, waiting up to timeout_s for one."""
        queues = self._ordered_queues
        keys = [q.key for q in queues] + [q.intermediate_queue_key for q in queues]
        deadline = time.monotonic() + timeout_s
        while True:
            taken = self._take_job_script(keys=keys)
            if taken:
                queue_key, job_id = (item.decode() if isinstance(item, bytes) else item for item in taken)
                queue = next(q for q in queues if q.key == queue_key)
                try:
                    return Job.fetch(job_id, connection=self.connection, serializer=self.serializer), queue
                except NoSuchJobError:  # deleted while queued (its record expired): nothing to run
                    self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
                    continue
            if time.monotonic() >= deadline:
                return None
            time.sleep(IDLE_POLL_S)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        self.set_state(WorkerStatus.IDLE)
        self.procline("fgs worker: waiting for jobs")
        poll_s = self.runtime.settings.worker_queue_poll_s
        while True:
            if self._stop_requested:
                # A stop signal that came while RQ still counted us busy (between the end of a job and the
                # set_state above) only set this flag; RQ checks it once per job, this loop once per poll.
                raise StopRequested()
            try:
                self.heartbeat()
                self.runtime.beat(force=True)
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                self._refresh_queues()
                self._enqueue_due_retries()
                result = self._take_job(poll_s)
            except REDIS_DOWN as error:
                self._wait_for_redis(error)
                continue
            if result is not None:
                job, queue = result
                self.reorder_queues(queue)
                log.info("worker %s: job %s from %s", self.name, job.id, queue.name)
                return result

    # ---- jobs ----
    def execute_job(self, job, queue):
        token = set_current_runtime(self.runtime)
        self.runtime.current_jobs = []  # set by run_generate_job once it owns the records
        try:
            super().execute_job(job, queue)
            self.runtime.companions.settle()  # RQ's end of each companion, after the job that claimed them
        except REDIS_DOWN as error:
            # Redis went away mid-job (RQ could not even record the failure). Once it is back, the RQ executions
            # (the job's and its companions') are taken for abandoned and retried (their heartbeats stopped);
            # the records go back to `queued` now, each with its owner token (one another worker took is left).
            dropped, self.runtime.current_jobs = self.runtime.current_jobs, []
            self.runtime.companions.drop()
            if self.runtime.watchdog is not None:
                self.runtime.watchdog.disarm()
            self._wait_for_redis(error)
            message = ErrorBody(code="retrying", message=f"Redis became unavailable mid-job ({error})")
            for job_id, owner in dropped:
                self.runtime.records.transition(
                    job_id, JobState.queued, (JobState.running,), expect_owner=owner, error=message.model_dump_json()
                )
        finally:
            # RQ forgets an execution in its cleanup, which a Redis error skips. A SimpleWorker runs one job at
            # a time, so whatever is left here is stale; left in place, `self.execution` (the first entry) would
            # name it, and the heartbeats of every later job would refresh the dead one, not the running one.
            # The same holds for companions RQ never heard the end of (fgs_worker.shared_batch).
            self.runtime.companions.drop()
            self.executions.clear()
            reset_current_runtime(token)

    def _rq_heartbeat(self) -> None:
        """Called from the step callback: keep RQ's view of this worker and its job alive during long jobs.

        RQ scores the job's execution in the queue's started-job registry with an expiry time; another worker's
        maintenance retries an execution whose time has passed (AbandonedJobError). Refreshing it with
        `abandoned_after_s` on every beat means: a long job is never taken for abandoned while it samples, and
        the job of a killed worker is retried elsewhere soon after (jobs.run_generate_job takes its record over).
        """
        ttl = self.runtime.settings.abandoned_after_s
        running = self._running()  # the job's execution and its companions' (fgs_worker.shared_batch)
        with self.connection.pipeline() as pipe:
            self.heartbeat(self.runtime.settings.job_timeout_s + 60, pipeline=pipe)
            for execution, job in running:
                execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
                job.heartbeat(rq_now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        """The expiry RQ gives a new execution in the started-job registry: `abandoned_after_s`, not RQ's job
        timeout + 60 s. Our beats refresh it during the job, the first one right after the claim; with RQ's
        value, a worker killed before that beat left its job stranded for the whole job timeout (an hour)."""
        return self.runtime.settings.abandoned_after_s

    def teardown(self):
        super().teardown()
        self.runtime.retire()


def write_ready_file(path: Path, worker_name: str) -> None:
    """Write `path` atomically, so a probe never sees a half-written file."""
    write_atomic(path, f"{worker_name}\n")


def run_worker(settings: Settings | None = None, name: str | None = None, ready_file: Path | None = None) -> None:
    """Load the model and work until SIGTERM/SIGINT (finishing the job in hand).

    `ready_file` is written once the model is resident and removed on exit (the container probes test it).
    """
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    sweep_check_scratch(Path(tempfile.gettempdir()))  # what a killed worker's classifier check left
    log.info("loading model %s", settings.model)
    runtime = WorkerRuntime.load(settings, name=name)
    log.info("worker %s ready on %s", runtime.name, runtime.device)
    worker = FgsWorker(runtime)
    try:
        if ready_file is not None:
            write_ready_file(ready_file, runtime.name)
        worker.work(logging_level="INFO")
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m fgs_worker.main [--ready-file PATH]` (what `fgs worker` and `fgs up` start)."""
    parser = argparse.ArgumentParser(prog="fgs worker", description="one fgs worker process (model from FGS_MODEL)")
    parser.add_argument("--ready-file", type=Path, help="written once the model is resident, removed on exit")
    args = parser.parse_args(argv)
    run_worker(ready_file=args.ready_file)


if __name__ == "__main__":
    main()
