"""The one module that knows RQ's internals: its key prefix, its private methods and fields, and the Redis
structures of its own (job hashes, queue lists, intermediate lists, registries, executions) that fgs reads or
writes without RQ's public API. Written against RQ `WRITTEN_FOR_RQ`; tests/test_rq_adapter.py fails, saying so,
when another RQ is installed: rerun the worker and queue tests (tests/test_worker_*.py, test_shared_batch*.py,
test_job_queue.py, test_faults_*.py) against it and change this module, then the pin.

The API (fgs_service.job_queue) and the worker (fgs_worker.main, fgs_worker.shared_batch, fgs_worker.jobs) use
RQ's public API directly (queues, jobs, `get_current_job`) and everything else through here: `FgsWorker` overrides
no method of RQ's worker, it implements `RqWorker`'s hooks. The fgs_service and fgs_worker packages import this
module first (their `__init__`): it sets RQ's key prefix before rq is imported.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

WRITTEN_FOR_RQ = "3.0.0"
# How often the worker's command listener (RQ's pubsub thread) looks up from its wait: what stopping it can take
PUBSUB_POLL_S = 1.0


def export_rq_key_prefix() -> str:
    """Put RQ's own keys (queues, job hashes, registries, workers, results) under FGS_REDIS_PREFIX, as
    `{prefix}:rq:...`, so that two deployments on one Redis never see each other's jobs.

    RQ 3.0 reads its key prefix from the environment (RQ_KEY_PREFIX, rq/defaults.py) once, when `rq` is first
    imported; so this runs when this module is imported, before its own import of rq, and the processes fgs starts
    inherit it. An RQ_KEY_PREFIX already set (by the operator, or by the parent process) wins: a process's children
    agree with it; an empty one counts as unset.
    """
    # The one read of an FGS_ setting outside fgs_common.settings: it must happen before rq is imported, which is
    # before a Settings object can exist in a process (its default, "fgs", is Settings.redis_prefix's).
    if not os.environ.get("RQ_KEY_PREFIX"):
        os.environ["RQ_KEY_PREFIX"] = f"{os.environ.get('FGS_REDIS_PREFIX') or 'fgs'}:rq"
    return os.environ["RQ_KEY_PREFIX"]


export_rq_key_prefix()

# rq is imported only now: it reads RQ_KEY_PREFIX at import.
from rq import Queue  # noqa: E402
from rq.exceptions import NoSuchJobError, StopRequested  # noqa: E402
from rq.executions import Execution, ExecutionRegistry  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.registry import FailedJobRegistry  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402
from rq.utils import current_timestamp, now, utcformat  # noqa: E402
from rq.worker import SimpleWorker, WorkerStatus  # noqa: E402

# ---- the API's side: queued jobs ----


def queue_key(queue_name: str) -> str:
    """The Redis list of RQ queue `queue_name`."""
    return Queue.redis_queue_namespace_prefix + queue_name


def remove_queued_job(connection: Any, queue: Queue, job_id: str) -> bool:
    """Take a job still waiting in its queue out of it, with its RQ job hash; False when a worker took it already
    (the worker skips it: its record's claim fails)."""
    if not connection.lrem(queue.key, 1, job_id):
        return False
    connection.delete(Job.key_for(job_id))
    return True


# What the enqueued function returns for a job another worker owns now (fgs_worker.job_results.lost): RQ's
# success path sees it and ends only this worker's execution, never the job (`RqWorker._finalize_success`).
LOST = {"lost": True}


def repeat_at_end_of_queue(job: Job) -> None:
    """RQ runs the job once more after this execution, queued at the end of its queue (a job that yields)."""
    job.repeats_left, job.repeat_intervals = 1, [0]


# ---- the worker's side ----

# Take the first job of the first non-empty queue (KEYS: the queues in serving order, then their intermediate
# lists) by moving it to that queue's intermediate list, RQ's own write-ahead place for a job in hand (rq
# IntermediateQueue). A plain LPOP, as RQ uses for several queues, loses the job if the worker dies before
# RQ registers the execution: the 30-minute soak lost one that way. From the intermediate list it is taken
# out once the execution is registered, or put back by `requeue_jobs_lost_in_hand`.
TAKE_JOB_LUA = """
local n = #KEYS / 2
for i = 1, n do
  local job_id = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
  if job_id then return {KEYS[i], job_id} end
end
return false
"""
# Put a job lost in hand back at the front of its queue, in one step (LREM, then a crash, would lose it again).
# KEYS: intermediate list, queue; ARGV: job id.
_PUT_BACK_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""
# Move a due retry back into its queue in one step (ZREM alone, then a crash, would drop the retry).
# KEYS: scheduled registry, queue, job hash; ARGV: job id.
_REQUEUE_DUE_RETRY_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 or redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('HSET', KEYS[3], 'status', 'queued')
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""
# Start companions of a shared batch (fgs_worker.shared_batch) as RQ starts a job, in one step per batch.
# KEYS: per chosen job, its RQ queue list, its queue's started-job registry, its RQ job hash
# ARGV: the registry score (expiry), the worker's name, the start time (RQ's format), then per job: id, execution id
# Returns one flag per job: 1 claimed, 0 already taken by another worker (or canceled and removed by the API).
_CLAIM_QUEUED_LUA = """
local claimed = {}
for i = 1, #KEYS / 3 do
  local job_id, execution_id = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local queue, started, job = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  if redis.call('LREM', queue, 1, job_id) == 1 then
    redis.call('ZADD', started, ARGV[1], job_id .. ':' .. execution_id)
    redis.call('HSET', job, 'status', 'started', 'worker_name', ARGV[2], 'started_at', ARGV[3],
               'last_heartbeat', ARGV[3])
    redis.call('PERSIST', job)
    claimed[i] = 1
  else
    claimed[i] = 0
  end
end
return claimed
"""


class RqWorker(SimpleWorker):
    """RQ's non-forking worker as fgs drives it: every override of RQ's worker methods and every use of its private
    fields and structures. `fgs_worker.main.FgsWorker` subclasses it and implements the hooks below (`poll_for_job`,
    `wait_for_redis`, `maintain`, `run_job`, `retire`), never an RQ method.

    - `dequeue_job_and_maintain_ttl`: our idle loop: RQ's worker heartbeat, its maintenance when due, then
      `poll_for_job`; it also stops on a signal that came while RQ still counted the worker busy;
    - `check_for_suspension`, `heartbeat`, `run_maintenance_tasks`: a Redis outage (`outage_errors`) is handed to
      `wait_for_redis` instead of ending the worker; maintenance runs inside `maintain`;
    - `execute_job`: RQ's execution of a job runs inside `run_job`, and what RQ's cleanup left is forgotten after;
    - `teardown`: RQ's, then `retire`;
    - `subscribe`: RQ's, with a listener that looks up every `PUBSUB_POLL_S`, so that RQ's `unsubscribe` at
      shutdown does not wait a minute on it;
    - `reorder_queues`, `serve_in_order`: the round robin starts after the queue served last (`last_served`);
    - `prepare_job_execution`: every job passes through its queue's intermediate list (`take_job`);
    - `get_heartbeat_ttl`, `heartbeat_executions`, `expire_executions`: executions live `execution_ttl_s` past
      their last beat, which our beats refresh, and the watchdog expires;
    - `claim_queued`, `finalize`, `forget_execution`: executions started and ended beside the worker's own job
      (the companions of a shared batch);
    - `_finalize_success`: a job whose result is `LOST` (another worker took it over) is left as it is in RQ.
    """

    def __init__(self, queues: list[Queue], name: str, connection: Any, maintenance_interval: int, execution_ttl_s):
        super().__init__(
            queues,
            name=name,
            connection=connection,
            serializer=JSONSerializer,
            maintenance_interval=maintenance_interval,
        )
        self.execution_ttl_s = execution_ttl_s
        self.last_served: str | None = None
        self._take_job_script = connection.register_script(TAKE_JOB_LUA)
        self._requeue_due_retry = connection.register_script(_REQUEUE_DUE_RETRY_LUA)
        self._put_back = connection.register_script(_PUT_BACK_LUA)
        self._claim_queued = connection.register_script(_CLAIM_QUEUED_LUA)

    # ---- the hooks a subclass implements: where RQ's worker hands over to fgs ----
    # Errors that mean Redis is unreachable: RQ's calls that raise them go to `wait_for_redis`, and the worker
    # carries on when it returns.
    outage_errors: tuple[type[BaseException], ...] = ()

    def poll_for_job(self) -> tuple[Job, Queue] | None:
        """One pass of the idle loop, after RQ's heartbeat and maintenance: the next job and its queue, or None."""
        raise NotImplementedError

    def wait_for_redis(self, error: BaseException) -> None:
        """Return once Redis answers again (or raise StopRequested); the default gives up at once."""
        raise error

    def maintain(self, rq_maintenance: Callable[[], None]) -> None:
        """One maintenance pass; `rq_maintenance` is RQ's own (its abandoned-job sweep among others)."""
        rq_maintenance()

    def run_job(self, job: Job, queue: Queue, rq_execute: Callable[[], None]) -> None:
        """Run one job; `rq_execute` is RQ's execution of it (the enqueued function, then RQ's success or failure)."""
        rq_execute()

    def retire(self) -> None:
        """The worker stops (after RQ's teardown)."""

    # ---- RQ's worker methods, each handing over to a hook ----
    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        self.set_state(WorkerStatus.IDLE)
        self.procline("fgs worker: waiting for jobs")
        while True:
            if self._stop_requested:
                # A stop signal that came while RQ still counted us busy (between the end of a job and the
                # set_state above) only set this flag; RQ checks it once per job, this loop once per poll.
                raise StopRequested()
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            result = self.poll_for_job()
            if result is not None:
                self.reorder_queues(result[1])
                return result

    def subscribe(self) -> None:
        # RQ 3.0 listens on its command channel with get_message(timeout=60), and redis-py 8's
        # PubSubWorkerThread.stop() waits for the listener to end: a worker's shutdown hung up to 60 s in
        # `unsubscribe` whenever the UNSUBSCRIBE reply was read before the stop flag was set (the listener went
        # back to its minute's wait). Seen under load (tests/test_worker_lifecycle.py, 6 Dec 2026); a command
        # still wakes the listener at once.
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except self.outage_errors as error:
            self.wait_for_redis(error)

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None:  # inside a pipeline: nothing reaches Redis until the caller executes it
            return super().heartbeat(timeout, pipeline=pipeline)
        try:
            return super().heartbeat(timeout)
        except self.outage_errors as error:
            self.wait_for_redis(error)

    def run_maintenance_tasks(self) -> None:
        try:
            self.maintain(super().run_maintenance_tasks)
        except self.outage_errors as error:
            self.wait_for_redis(error)

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            self.run_job(job, queue, lambda: super(RqWorker, self).execute_job(job, queue))
        finally:
            # RQ forgets an execution in its cleanup, which a Redis error skips: forget what is left (the
            # companions' too), so the next job's heartbeats refresh the right one.
            self.forget_executions()

    def teardown(self) -> None:
        try:
            super().teardown()  # RQ's register_death, which a Redis outage makes raise
        finally:
            self.retire()

    # ---- queues ----
    def queue(self, name: str) -> Queue:
        return Queue(name, connection=self.connection, serializer=JSONSerializer)

    def serve_in_order(self, names: list[str]) -> None:
        """Serve the queues `names`, starting after the one served last."""
        if self.last_served in names:
            cut = names.index(self.last_served) + 1
            names = names[cut:] + names[:cut]
        self.queues = [self.queue(name) for name in names]
        self._ordered_queues = self.queues[:]

    def reorder_queues(self, reference_queue: Queue) -> None:
        self.last_served = reference_queue.name

    def take_job(self, timeout_s: float, idle_poll_s: float) -> tuple[Job, Queue] | None:
        """The first job of the first non-empty queue in serving order, waiting up to timeout_s for one."""
        queues = self._ordered_queues
        keys = [q.key for q in queues] + [q.intermediate_queue_key for q in queues]
        deadline = time.monotonic() + timeout_s
        while True:
            taken = self._take_job_script(keys=keys)
            if taken:
                queue_key_taken, job_id = (item.decode() if isinstance(item, bytes) else item for item in taken)
                queue = next(q for q in queues if q.key == queue_key_taken)
                try:
                    return Job.fetch(job_id, connection=self.connection, serializer=self.serializer), queue
                except NoSuchJobError:  # deleted while queued (its record expired): nothing to run
                    self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
                    continue
            if time.monotonic() >= deadline:
                return None
            time.sleep(idle_poll_s)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # every job we take passes through its queue's intermediate list (`take_job`); RQ removes it from there
        # only for single-queue workers
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def enqueue_due_retries(self, on_dropped: Callable[[str], None]) -> None:
        """Retries with backoff wait in each queue's scheduled registry; move the due ones back."""
        for queue in self.queues:
            registry = queue.scheduled_job_registry
            for job_id in registry.get_jobs_to_schedule():
                # one script decides which worker moves it, when several look at once
                keys = [registry.key, queue.key, Job.key_for(job_id)]
                if not self._requeue_due_retry(keys=keys, args=[job_id]):
                    on_dropped(job_id)

    def jobs_in_hand(self, queue: Queue) -> list[str]:
        """Jobs taken from `queue` (its intermediate list) whose execution is not registered (yet)."""
        return [i for i in queue.intermediate_queue.get_job_ids() if i not in queue.started_job_registry]

    def put_back(self, queue: Queue, job_id: str) -> bool:
        """A job lost in hand back at the front of its queue (it has waited its turn already)."""
        return bool(self._put_back(keys=[queue.intermediate_queue_key, queue.key], args=[job_id]))

    def failed_since(self, queue: Queue, since: float) -> list[tuple[str, float]]:
        """(job id, score) of the jobs in `queue`'s failed registry scored from `since` on (scores only grow:
        expiry = failure time + failure TTL)."""
        registry = FailedJobRegistry(queue.name, connection=self.connection, serializer=JSONSerializer)
        entries = self.connection.zrangebyscore(registry.key, since, "+inf", withscores=True)
        return [(member.decode() if isinstance(member, bytes) else member, score) for member, score in entries]

    # ---- executions ----
    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        """The expiry RQ gives a new execution in the started-job registry: `execution_ttl_s`, not RQ's job
        timeout + 60 s. Our beats refresh it during the job, the first one right after the claim; with RQ's
        value, a worker killed before that beat left its job stranded for the whole job timeout (an hour)."""
        return self.execution_ttl_s

    def running(self) -> list[tuple[Execution, Job]]:
        """The executions this worker runs (its job's and its companions') and their jobs."""
        running = []
        for execution in list(self.executions.values()):
            if execution._job is None:
                execution._job = Job.fetch(execution.job_id, connection=self.connection, serializer=JSONSerializer)
            running.append((execution, execution._job))
        return running

    def heartbeat_executions(self, worker_ttl: int) -> None:
        """Keep this worker (for `worker_ttl`) and its running executions (for `execution_ttl_s`) alive in RQ."""
        ttl = self.execution_ttl_s
        running = self.running()
        with self.connection.pipeline() as pipe:
            self.heartbeat(worker_ttl, pipeline=pipe)
            for execution, job in running:
                execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
                job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()

    def expire_executions(self) -> None:
        """Score the running executions as expired in their started-job registries: the next abandon sweep (this
        worker's restart, or any worker's maintenance) retries or fails each at once."""
        for execution, job in self.running():
            self.connection.zadd(job.started_job_registry.key, {execution.composite_key: 1}, xx=True)

    def forget_executions(self) -> None:
        """Forget every execution RQ did not clean up (its cleanup is skipped by a Redis error). A SimpleWorker runs
        one job at a time, so whatever is left is stale; left in place, `self.execution` (the first entry) would
        name it, and the heartbeats of every later job would refresh the dead one, not the running one."""
        self.executions.clear()

    # ---- companions: executions started beside the worker's own job ----
    def claim_queued(self, chosen: list[tuple[Queue, str]]) -> list[tuple[Job, Queue, Execution]]:
        """Take the `chosen` (queue, job id) off their queues and start them in RQ as this worker's, in one step;
        the ones claimed (another worker may have taken one first)."""
        ttl = self.execution_ttl_s
        execution_ids = [uuid.uuid4().hex for _ in chosen]
        keys: list[str] = []
        argv: list[Any] = [current_timestamp() + ttl, self.name, utcformat(now())]
        for (queue, job_id), execution_id in zip(chosen, execution_ids, strict=True):
            keys += [queue.key, queue.started_job_registry.key, Job.key_for(job_id)]
            argv += [job_id, execution_id]
        flags = self._claim_queued(keys=keys, args=argv)
        claimed = []
        for (queue, job_id), execution_id, flag in zip(chosen, execution_ids, flags, strict=True):
            if int(flag) == 1:
                job, execution = self._start_execution(job_id, execution_id)
                claimed.append((job, queue, execution))
        return claimed

    def _start_execution(self, job_id: str, execution_id: str) -> tuple[Job, Execution]:
        """The rest of RQ's start of an execution (Execution.create without the registry entry the claim made)."""
        ttl = self.execution_ttl_s
        job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        execution = Execution(id=execution_id, job_id=job_id, connection=self.connection, worker_name=self.name)
        execution._job = job
        with self.connection.pipeline() as pipe:
            execution.save(ttl=ttl, pipeline=pipe)
            ExecutionRegistry(job_id=job_id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)
            pipe.sadd(execution.worker_executions_key, execution.composite_key)
            pipe.expire(execution.worker_executions_key, ttl + 60)
            pipe.execute()
        self.executions[execution.id] = execution
        return job, execution

    def finalize(self, job: Job, queue: Queue, execution: Execution, result: Any, exc_info: Any) -> None:
        """RQ's own end of an execution started by `claim_queued`: success with `result`, or failure with
        `exc_info` (RQ retries it with the job's own retries left, or files it failed)."""
        try:
            if exc_info is None:
                self._finalize_success(job, queue, execution, result)
            else:
                self._finalize_failure(job, queue, execution, exc_info)
        finally:
            self.forget_execution(execution)

    def forget_execution(self, execution: Execution) -> None:
        self.executions.pop(execution.id, None)

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        """RQ's success path, except for a job this worker lost (`LOST`): it belongs to the worker that took it
        over, whose execution RQ runs now. Ending it here (RQ's own path: status `finished`, result kept 600 s)
        hid that execution from the abandon sweep: the new owner killed after that, the job stayed `running` in
        its record forever (the 30-minute soak). Only this worker's stale execution is deleted; the abandon sweep
        that retried the job already took its started-registry entry out, and our heartbeats never put it back
        (they refresh entries that exist only), so the job is not retried a second time."""
        if return_value != LOST:
            super()._finalize_success(job, queue, execution, return_value)
            return
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()
        self.log.info("Worker %s: %s: job lost to another worker, left to it (%s)", self.name, queue.name, job.id)
