"""The worker process: load the model once, then take jobs from every tenant's queue in turn.

`FgsWorker` is an RQ SimpleWorker (no fork per job: the resident model and CUDA context survive between
jobs) that
- rediscovers tenant queues while idle (a tenant's queue appears with its first job),
- serves them round-robin, starting after the tenant it served last, so a tenant with a million queued images
  cannot starve one with ten; a job of many chunks yields between them when another tenant's job is queued
  (fgs_worker.batch_sampling, FGS_CHUNK_TARGET_S), so one large job holds the worker for about one chunk,
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

import gc

# Importing torch, diffusers and transformers leaves about 450,000 objects that the collector tracks
# (len(gc.get_objects())) and next to no garbage: with the collector on, a worker has run 1,206 collections by the
# end of these imports, and they have freed 10,000 objects in all (gc.get_stats()). That is a tenth of a worker's
# start-up CPU (bench/worker_start.py). Off for the imports below; on again after them, also when one of them
# fails (tests import this module into the test process).
_collecting = gc.isenabled()
gc.disable()
try:
    import argparse
    import logging
    import sys
    import tempfile
    import time
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    import redis
    from pydantic import ValidationError
    from rq import Queue
    from rq.exceptions import StopRequested
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from fgs_common.atomic_files import write_atomic
    from fgs_common.classifier_sandbox import sweep_check_scratch
    from fgs_common.job_records import ACTIVE_STATES, now_ts
    from fgs_common.rq_adapter import RqWorker, queue_key
    from fgs_common.settings import Settings, get_settings
    from fgs_common.wire import ErrorBody, JobState
    from fgs_worker.runtime import WorkerRuntime, running_jobs
    from fgs_worker.shared_batch import ExcInfo, SharedBatch
    from fgs_worker.watchdog import JobWatchdog, NullWatchdog
finally:
    if _collecting:
        gc.enable()

log = logging.getLogger("fgs.worker")

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
# Waits between attempts to reach Redis again: capped, so a worker is back within seconds of Redis.
REDIS_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
# An idle worker looks at its queues this often: a new job waits at most 50 ms for it, and an idle worker
# sends Redis 20 small scripts a second (a single Redis serves ~100,000).
IDLE_POLL_S = 0.05

# A job stays in an intermediate list for the milliseconds between taking it and registering its execution.
# Seen there twice this far apart, its worker died in between. Below RQ's own rule for these lists (one minute,
# then the job counts as failed and spends a retry), and our sweep runs before RQ's in each maintenance pass.
LOST_IN_HAND_S = 20.0


class FgsWorker(RqWorker):
    """A non-forking RQ worker over all tenant queues, round-robin.

    What it changes of RQ's own worker, through RQ's private methods and structures, is in
    `fgs_common.rq_adapter.RqWorker` (pinned to the RQ it was written for); this class implements that adapter's
    hooks (what fgs does at each point) and is the job code's `WorkerHost`, and overrides no method of RQ's.
    """

    outage_errors = REDIS_DOWN

    def __init__(self, runtime: WorkerRuntime, watchdog: bool = True):
        self.runtime = runtime
        settings = runtime.settings
        idle = Queue(f"{runtime.keys.prefix}:_none", connection=runtime.rq_redis, serializer=JSONSerializer)
        # Maintenance includes RQ's sweep for abandoned jobs (a started job whose heartbeat expired): run it as
        # often as a job can be abandoned, so a killed worker's job is retried within ~2x abandoned_after_s.
        super().__init__(
            [idle],
            name=runtime.name,
            connection=runtime.rq_redis,
            maintenance_interval=settings.abandoned_after_s,
            execution_ttl_s=settings.abandoned_after_s,
        )
        self.shared_batch = SharedBatch(self, runtime.records)
        self.watchdog: JobWatchdog | NullWatchdog = (
            JobWatchdog(settings, runtime.records, runtime.redis, runtime.keys.cancel) if watchdog else NullWatchdog()
        )

    # ---- what the job code asks of its worker (fgs_worker.runtime.WorkerHost, `current_host()` in a job;
    # expire_executions: RqWorker's) ----
    def claim_companions(self, origin: str, batch_key: str, images: int) -> list[tuple[str, int]]:
        return self.shared_batch.claim(origin, batch_key, images)

    def finish_companion(self, job_id: str, result: Any = None, exc_info: ExcInfo | None = None) -> None:
        self.shared_batch.finish(job_id, result=result, exc_info=exc_info)

    def rq_heartbeat(self) -> None:
        """Called on every beat inside a job: keep RQ's view of this worker and its jobs alive during long jobs.

        RQ scores a job's execution in the queue's started-job registry with an expiry time; another worker's
        maintenance retries an execution whose time has passed (AbandonedJobError). Refreshing it with
        `abandoned_after_s` on every beat means: a long job is never taken for abandoned while it samples, and
        the job of a killed worker is retried elsewhere soon after (fgs_worker.job_claim takes its record over).
        """
        self.heartbeat_executions(self.runtime.settings.job_timeout_s + 60)

    def others_waiting(self, queue_name: str) -> bool:
        """Whether a tenant queue other than `queue_name` holds a job (every tenant queue, also those that appeared
        since this job started): the running job then yields at its next chunk boundary (fgs_worker.batch_sampling)."""
        names = self.runtime.redis.smembers(self.runtime.keys.tenant_queues())
        others = [queue_key(n) for n in names if n != queue_name]
        if not others:
            return False
        with self.connection.pipeline(transaction=False) as pipe:
            for key in others:
                pipe.llen(key)
            return any(pipe.execute())

    # ---- Redis outages ----
    def wait_for_redis(self, error: BaseException) -> None:
        """Log, then wait until Redis answers again (capped backoff). The model stays resident."""
        log.error("worker %s: Redis unavailable (%s: %s); waiting for it", self.name, type(error).__name__, error)
        attempt = 0
        while not self.stop_requested:
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

    # ---- maintenance ----
    def maintain(self, rq_maintenance: Callable[[], None]) -> None:
        # the tenant queues first: at start-up RQ knows only the idle queue, and the first pass is the one
        # that retries a job this process was working on when its watchdog ended it
        self._refresh_queues()
        self.runtime.publish_model_info()  # again after a Redis that lost it (no AOF) comes back
        self.requeue_jobs_lost_in_hand()
        rq_maintenance()
        self.reconcile_failed_jobs()

    # ---- RQ's verdicts into our records ----
    def reconcile_failed_jobs(self) -> int:
        """Move the records of jobs RQ filed as failed (abandoned with no retries left, or failed outside our
        function) from queued/running to `failed`, with counters. Looks at each queue's failed registry from
        where the last pass stopped."""
        moved = 0
        for queue in self.queues:
            mark_key = f"{self.runtime.keys.prefix}:reconciled:{queue.name}"
            since = float(self.connection.get(mark_key) or 0)
            entries = self.failed_since(queue, since)
            for job_id, score in entries:
                moved += self._reconcile(job_id)
                since = max(since, score)
            if entries:
                self.connection.set(mark_key, since)
        return moved

    def _reconcile(self, job_id: str) -> int:
        records = self.runtime.records
        try:
            record = records.read(job_id, with_results=False)
        except ValidationError as error:  # a record this version cannot read: never a reason for RQ to quit
            log.warning("job %s: record unreadable, left as it is: %s", job_id, error)
            return 0
        if record is None or record.state not in ACTIVE_STATES:
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

    # ---- queues ----
    def _refresh_queues(self) -> None:
        names = sorted(self.runtime.redis.smembers(self.runtime.keys.tenant_queues()))
        if names:
            self.serve_in_order(names)

    def requeue_jobs_lost_in_hand(self) -> int:
        """Put back the jobs a worker took (intermediate list) but died before registering: seen there without an
        execution twice, LOST_IN_HAND_S apart. The job never ran, so it costs no retry (and if it had, the
        record's owner fencing lets only one run write)."""
        moved = 0
        for queue in self.queues:
            for job_id in self.jobs_in_hand(queue):
                seen_key = f"{self.runtime.keys.prefix}:in-hand-seen:{job_id}"
                first_seen = self.connection.get(seen_key)
                if first_seen is None:
                    self.connection.set(seen_key, time.time(), ex=int(10 * LOST_IN_HAND_S))
                elif time.time() - float(first_seen) >= min(
                    LOST_IN_HAND_S, self.runtime.settings.abandoned_after_s
                ) and self.put_back(queue, job_id):
                    self.connection.delete(seen_key)
                    log.warning("job %s put back in %s: its worker died before starting it", job_id, queue.name)
                    moved += 1
        return moved

    def poll_for_job(self) -> tuple[Job, Queue] | None:
        try:
            self.runtime.beat(force=True)
            self._refresh_queues()
            self.enqueue_due_retries(
                lambda job_id: log.warning("retry of job %s dropped: moved by another worker, or gone", job_id)
            )
            result = self.take_job(self.runtime.settings.worker_queue_poll_s, IDLE_POLL_S)
        except REDIS_DOWN as error:
            self.wait_for_redis(error)
            return None
        if result is not None:
            log.info("worker %s: job %s from %s", self.name, result[0].id, result[1].name)
        return result

    # ---- jobs ----
    def run_job(self, job: Job, queue: Queue, rq_execute: Callable[[], None]) -> None:
        self.runtime.current_jobs = []  # set by run_generate_job once it owns the records
        try:
            with running_jobs(self.runtime, self):
                rq_execute()
                self.shared_batch.settle()  # RQ's end of each companion, after the job that claimed them
        except REDIS_DOWN as error:
            # Redis went away mid-job (RQ could not even record the failure). Once it is back, the RQ executions
            # (the job's and its companions') are taken for abandoned and retried (their heartbeats stopped);
            # the records go back to `queued` now, each with its owner token (one another worker took is left).
            dropped, self.runtime.current_jobs = self.runtime.current_jobs, []
            self.shared_batch.drop()
            self.watchdog.disarm()
            self.wait_for_redis(error)
            message = ErrorBody(code="retrying", message=f"Redis became unavailable mid-job ({error})")
            for job_id, owner in dropped:
                self.runtime.records.transition(
                    job_id, JobState.queued, (JobState.running,), expect_owner=owner, error=message.model_dump_json()
                )
        finally:
            self.shared_batch.drop()  # the companions RQ did not end (a Redis error skipped it)

    def retire(self) -> None:
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
    # The model's Python objects live as long as the process: out of the collector's way, so that no collection
    # walks them again. A worker's exit after SIGTERM spent its time in the interpreter's last collection: 1.8 s
    # with fgs-digits on 2 quiet cores, 0.27 s frozen (2 runs each, 6 Dec 2026), and 12 to 20 s under load.
    gc.freeze()
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
