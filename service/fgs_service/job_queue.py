"""The job queue and the data-access layer under the routes: one RQ queue per tenant, JSON serializer, timeouts and
retries with backoff (RQ internals: fgs_common.rq_adapter).

An enqueue first reserves, in one Lua step, the tenant's quota and the Idempotency-Key (a reservation that
expires after FGS_ENQUEUE_RESERVATION_TTL_S), then writes the job records, the RQ jobs, the tenant's
queued-image count, the final Idempotency-Key and the release of the reservation in one MULTI. A process killed
anywhere in between leaves only reservations, which expire: no quota and no key leak, no half batch. Enqueueing
is the API's hot path, so it runs on the event loop with the asyncio Redis client: RQ only appends commands to the
pipeline it is handed (nothing in `enqueue_many` reads from Redis), and we send that pipeline ourselves.
The rarer calls (cancel, reconcile, inspection) use the blocking clients from the threadpool. The routers read
through this class only (`job`, `list_jobs`, `records_of`, `batch_summary`, `live_worker_names`, `live_workers`,
`ping`): key names stay here and in `fgs_common.job_records`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import anyio.to_thread
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from fgs_common import telemetry
from fgs_common.exceptions import EnqueueInProgress
from fgs_common.job_record import JobRecord
from fgs_common.job_records import ACTIVE_STATES, JobRecords, Keys, now_ts
from fgs_common.rq_adapter import queue_key, remove_queued_job
from fgs_common.settings import Settings
from fgs_common.wire import (
    BatchPublic,
    GenerateRequest,
    JobPublic,
    JobsPublic,
    JobState,
    ModelInfo,
    TenantLoadPublic,
    WorkerPublic,
)
from fgs_service.auth import Tenant

JOB_FUNCTION = "fgs_worker.jobs.run_generate_job"
# How long the API trusts the model info it read (workers publish it at start and at every maintenance pass).
MODEL_INFO_CACHE_S = 5.0
# A batch of more jobs than this is turned into Redis commands in a worker thread, not on the event loop
# (500 jobs take ~0.1 s of CPU, which would stall every other request meanwhile).
INLINE_JOBS = 16
# RQ states after which RQ runs a job no more (FAILED aside: RQ's error is the job's).
RQ_ENDED = frozenset({JobStatus.FINISHED, JobStatus.STOPPED, JobStatus.CANCELED})


# KEYS: tenant queued-image counter, tenant reservations (sorted set: member "token:images", score = expiry),
#       Idempotency-Key ("" when none)
# ARGV: now, reservation expiry, token, images, cap, the key's pending value
# Returns {1} reserved; {0, in use} over the cap; {2, value} the key was used (value "pending:..." while queueing)
_RESERVE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if KEYS[3] ~= '' then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then return {2, earlier} end
end
local pending = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  pending = pending + tonumber(string.match(member, ':(%d+)$'))
end
local in_use = tonumber(redis.call('GET', KEYS[1]) or '0') + pending
if in_use + tonumber(ARGV[4]) > tonumber(ARGV[5]) then return {0, in_use} end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3] .. ':' .. ARGV[4])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[6], 'PX', math.floor((ARGV[2] - ARGV[1]) * 1000)) end
return {1}
"""
_PENDING = "pending:"


class QueueFull(Exception):
    """The tenant's queued-image cap would be exceeded."""

    def __init__(self, queued: int, cap: int, wanted: int):
        super().__init__(f"tenant has {queued} images queued; cap is {cap}, this request adds {wanted}")
        self.retry_after_s = 30


@dataclass(frozen=True)
class Enqueued:
    ids: list[str]  # the job ids (for a replayed batch: empty, read them with batch_job_ids)
    replayed: bool  # an Idempotency-Key matched an earlier request: these are the first request's ids
    batch_id: str | None = None


class JobQueue:
    """Enqueue, cancel and inspect jobs. `redis` decodes responses (records); `rq_redis` is raw bytes (RQ);
    `async_redis` (decoding) carries the enqueue path."""

    def __init__(self, redis: Any, rq_redis: Any, async_redis: Any, settings: Settings):
        self.redis = redis
        self.rq_redis = rq_redis
        self.async_redis = async_redis
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.records = JobRecords(redis, settings.redis_prefix, settings.job_record_ttl_s)
        self.queue = lru_cache(maxsize=1024)(self._queue)  # a Queue asks Redis its version once, then remembers
        self._model_info: tuple[float, ModelInfo | None] = (0.0, None)

    def _queue(self, tenant: str) -> Queue:
        return Queue(self.keys.queue_name(tenant), connection=self.rq_redis, serializer=JSONSerializer)

    def _retry(self) -> Retry | None:
        if self.settings.job_retries <= 0:
            return None
        return Retry(max=self.settings.job_retries, interval=self.settings.retry_backoff_s)

    async def model_info(self) -> ModelInfo | None:
        """What the workers' model accepts, as they published it; None before any worker has started."""
        read_at, info = self._model_info
        if time.monotonic() - read_at > MODEL_INFO_CACHE_S:
            raw = await self.async_redis.get(self.keys.model_info())
            info = ModelInfo.model_validate_json(raw) if raw else None
            self._model_info = (time.monotonic(), info)
        return info

    # ---- idempotency ----
    def _idempotency_key(self, tenant: Tenant, key: str, scope: str) -> str:
        digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()[:32]
        return self.keys.idempotency(tenant.name, digest)

    # ---- enqueue ----
    async def enqueue(
        self,
        tenant: Tenant,
        requests: list[GenerateRequest],
        batch_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Enqueued:
        """Queue one job per request. With `batch_id` the jobs form a batch (stored with the batch)."""
        job_ids = [uuid.uuid4().hex for _ in requests]
        scope = "batch" if batch_id else "job"
        final_value = batch_id if batch_id else job_ids[0]
        idem_key = self._idempotency_key(tenant, idempotency_key, scope) if idempotency_key else ""
        images = sum(r.num_images for r in requests)
        token = uuid.uuid4().hex
        now = now_ts()
        ttl = self.settings.enqueue_reservation_ttl_s
        reply = await self.async_redis.eval(
            _RESERVE_LUA,
            3,
            self.keys.queued_images(tenant.name),
            self.keys.reservations(tenant.name),
            idem_key,
            now,
            now + ttl,
            token,
            images,
            tenant.max_queued_images,
            _PENDING + final_value,
        )
        if int(reply[0]) == 2:
            earlier = reply[1]
            if earlier.startswith(_PENDING):
                raise EnqueueInProgress(ttl)
            return Enqueued([], replayed=True, batch_id=earlier) if batch_id else Enqueued([earlier], replayed=True)
        if int(reply[0]) == 0:
            raise QueueFull(int(reply[1]), tenant.max_queued_images, images)
        member = f"{token}:{images}"
        try:
            async with self.async_redis.pipeline(transaction=True) as pipe:
                if len(requests) > INLINE_JOBS:
                    await anyio.to_thread.run_sync(self._write_jobs, pipe, tenant, requests, job_ids, batch_id)
                else:
                    self._write_jobs(pipe, tenant, requests, job_ids, batch_id)
                pipe.incrby(self.keys.queued_images(tenant.name), images)
                pipe.zrem(self.keys.reservations(tenant.name), member)
                if idem_key:
                    pipe.set(idem_key, final_value, ex=self.settings.idempotency_ttl_s)
                await pipe.execute()
        except BaseException:
            # Release at once what the MULTI did not take over (if this fails too, the reservation expires).
            with anyio.CancelScope(shield=True):
                try:
                    await self.async_redis.zrem(self.keys.reservations(tenant.name), member)
                    if idem_key:
                        await self.async_redis.delete(idem_key)
                except Exception:  # Redis down: the reservation expires on its own
                    pass
            raise
        return Enqueued(job_ids, replayed=False, batch_id=batch_id)

    def _write_jobs(
        self, pipe: Any, tenant: Tenant, requests: list[GenerateRequest], job_ids: list[str], batch_id: str | None
    ) -> None:
        """Append the batch, the job records and the RQ jobs to `pipe` (commands only: nothing is sent)."""
        now = now_ts()
        retry = self._retry()
        queue = self.queue(tenant.name)
        if batch_id:
            pipe.hset(
                self.keys.batch(batch_id),
                mapping={"tenant": tenant.name, "job_ids": ",".join(job_ids), "created_at": now},
            )
            pipe.expire(self.keys.batch(batch_id), self.settings.job_record_ttl_s)
        for job_id, request in zip(job_ids, requests, strict=False):
            self.records.create(pipe, job_id, tenant.name, request, batch_id, now)
        datas = [
            Queue.prepare_data(
                JOB_FUNCTION,
                args=(),  # the function reads its RQ job id; no args keeps RQ's job hash compact
                job_id=job_id,
                timeout=self.settings.job_timeout_s,
                result_ttl=600,
                failure_ttl=self.settings.job_record_ttl_s,
                description="generate",
                retry=retry,
            )
            for job_id in job_ids
        ]
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.sadd(self.keys.tenant_queues(), queue.name)

    # ---- reads ----
    def ping(self) -> None:
        """Raise if Redis does not answer."""
        self.redis.ping()

    def live_worker_names(self) -> list[str]:
        """Names of the workers whose heartbeat key has not expired."""
        pattern = self.keys.worker_alive_pattern()
        return sorted(key.rsplit(":", 1)[1] for key in self.redis.scan_iter(match=pattern, count=1000))

    def job(self, tenant: Tenant, job_id: str) -> JobPublic | None:
        """The tenant's job, reconciled with RQ; None when there is no such job or it is another tenant's."""
        record = self.records.read(job_id)
        if record is None or record.tenant != tenant.name:
            return None
        return self.reconcile(record).public()

    def list_jobs(self, tenant: Tenant, state: JobState | None, limit: int, offset: int) -> JobsPublic:
        """A page of the tenant's jobs, newest first; `state` filters within the page; `total`: all the tenant's
        jobs, what limit and offset page through."""
        ids = self.redis.zrevrange(self.keys.tenant_jobs(tenant.name), offset, offset + limit - 1)
        jobs = [
            record.public()
            for record in self.records.read_many(ids)
            if record is not None and (state is None or record.state is state)
        ]
        return JobsPublic(jobs=jobs, count=len(jobs), total=self.tenant_job_count(tenant))

    def batch_summary(self, tenant: Tenant, batch_id: str) -> BatchPublic | None:
        """Counts of the batch's jobs by state and its images done / total; None when the tenant has no such batch."""
        job_ids = self.batch_job_ids(tenant, batch_id)
        if job_ids is None:
            return None
        counts = {state: 0 for state in JobState}
        done = total = 0
        for state, images_done, images_total in self.records.summaries(
            job_ids, "state", "images_done", "images_total"
        ).values():
            if state is None:  # the record expired before the batch did
                continue
            counts[JobState(state)] += 1
            done += int(images_done or 0)
            total += int(images_total or 0)
        return BatchPublic(batch_id=batch_id, job_ids=job_ids, counts=counts, images_done=done, images_total=total)

    def batch_job_ids(self, tenant: Tenant, batch_id: str) -> list[str] | None:
        """The batch's job ids, or None when there is no such batch of this tenant."""
        owner, job_ids = self.redis.hmget(self.keys.batch(batch_id), "tenant", "job_ids")
        if owner != tenant.name:
            return None
        return job_ids.split(",") if job_ids else []

    # ---- cancel ----
    def cancel(self, tenant: Tenant, job_id: str) -> bool:
        """Cancel a queued job (it never runs) or ask a running one to stop. False if already final."""
        if self.records.transition(job_id, JobState.canceled, (JobState.queued,), finished_at=now_ts()):
            # Only a job still in the list is ours to delete; one a worker already popped is skipped by the
            # worker (its claim queued -> running fails) and expires with RQ's result TTL.
            remove_queued_job(self.rq_redis, self.queue(tenant.name), job_id)
            return True
        record = self.records.read(job_id, with_results=False)
        if record is not None and record.state is JobState.running:
            # the worker checks this flag between denoising steps (fgs_worker.cancel)
            self.redis.set(self.keys.cancel(job_id), "1", ex=self.settings.job_timeout_s + 600)
            return True
        return False

    # ---- failures RQ saw but the job never reported (worker killed hard, timeout in teardown) ----
    def reconcile(self, record: JobRecord) -> JobRecord:
        """Settle an active job that RQ will not run again; the record as it is now.

        - RQ filed it failed (its worker killed with no retries left): `failed`, `worker_failed`, RQ's error.
        - RQ counts it ended (finished, stopped, canceled) or has dropped its job hash, and no live worker holds
          the record: `failed`, `worker_lost`. Nothing would ever move it otherwise, and a client following it
          (SSE, which reads through here) would wait forever; the 30-minute soak had one. It is failed, not
          requeued: its RQ retries and backoff are gone with its RQ job, and an owner whose heartbeat key merely
          expired (a paused worker) may resume; a failed record fences it out, a second run would not.
        """
        if record.state not in ACTIVE_STATES:
            return record
        try:
            job = Job.fetch(record.job_id, connection=self.rq_redis, serializer=JSONSerializer)
        except NoSuchJobError:
            job = None
        status = job.get_status(refresh=False) if job is not None else None
        if status == JobStatus.FAILED:
            message = (job.exc_info or "the worker stopped without reporting").strip().splitlines()[-1][:2000]
            error = {"code": "worker_failed", "message": message}
        elif job is not None and status not in RQ_ENDED:
            return record  # RQ runs it, or will
        elif record.worker and self.redis.exists(self.keys.worker_alive(record.worker)):
            return record  # its worker may still end it
        else:
            ended = "has no job for it any more" if job is None else f"counts it {status.value}"
            message = (
                f"the job was left {record.state.value} by worker {record.worker or '(none)'}, which is gone, and "
                f"RQ {ended}: nothing will run it; submit it again"
            )
            error = {"code": "worker_lost", "message": message}
        self.records.transition(record.job_id, JobState.failed, ACTIVE_STATES, error=error, finished_at=now_ts())
        return self.records.read(record.job_id) or record

    def queue_depths(self) -> dict[str, int]:
        names = sorted(self.redis.smembers(self.keys.tenant_queues()))
        prefix = self.keys.prefix + ":"
        with self.rq_redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(queue_key(name))
            counts = pipe.execute()
        return {name.removeprefix(prefix): int(count) for name, count in zip(names, counts, strict=False)}

    # ---- reads for the page and the operator view (routers never touch key names or RQ registries) ----
    def tenant_job_ids(self, tenant: Tenant, offset: int = 0, limit: int = 100) -> list[str]:
        """The tenant's job ids, newest first."""
        return self.redis.zrevrange(self.keys.tenant_jobs(tenant.name), offset, offset + limit - 1)

    def tenant_job_count(self, tenant: Tenant) -> int:
        return int(self.redis.zcard(self.keys.tenant_jobs(tenant.name)))

    def records_of(self, job_ids: list[str], with_results: bool = True) -> list[JobRecord | None]:
        """The jobs' records in one round trip (None for a job that no longer exists); without results only the
        record's small fields and its request are read."""
        return self.records.read_many(job_ids, with_results)

    def cancel_batch(self, tenant: Tenant, job_ids: list[str]) -> int:
        """Cancel every job of a batch that is not final yet; returns how many were canceled."""
        return sum(1 for job_id in job_ids if self.cancel(tenant, job_id))

    def tenant_loads(self) -> list[TenantLoadPublic]:
        """Per tenant with a queue: jobs waiting, images queued or running, jobs running."""
        depths = self.queue_depths()
        with self.redis.pipeline(transaction=False) as pipe:
            for tenant in depths:
                pipe.get(self.keys.queued_images(tenant))
            queued = pipe.execute()
        running: dict[str, int] = {}
        for tenant in depths:
            running[tenant] = len(self._queue(tenant).started_job_registry.get_job_ids(cleanup=False))
        return [
            TenantLoadPublic(
                tenant=tenant,
                queued_jobs=int(depths[tenant]),
                queued_images=int(images or 0),
                running_jobs=running[tenant],
            )
            for tenant, images in zip(depths, queued, strict=False)
        ]

    def live_workers(self) -> list[WorkerPublic]:
        """Workers whose heartbeat has not expired, with their last beat and the job each is running."""
        alive = self.redis.scan_iter(match=self.keys.worker_alive_pattern(), count=1000)
        names = sorted(key.rsplit(":", 1)[1] for key in alive)
        started = self._registry_job_ids("started_job_registry")
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(telemetry.worker_gauge_key(self.keys.prefix, name), "last_heartbeat")
            beats = pipe.execute()
        running = {}
        for job_id, (worker, tenant, state) in self.records.summaries(started, "worker", "tenant", "state").items():
            if worker and state == JobState.running.value:
                running[worker] = {"job_id": job_id, "job_tenant": tenant}
        return [
            WorkerPublic(
                name=name,
                last_heartbeat=datetime.fromtimestamp(float(beat), UTC) if beat else None,
                **running.get(name, {}),
            )
            for name, beat in zip(names, beats, strict=False)
        ]

    def recent_job_records(self) -> list[JobRecord]:
        """Records (without results) of the jobs RQ ran lately: running, finished within its result TTL, failed.

        RQ keeps a finished job for `result_ttl` (600 s), which bounds how far back the throughput reaches.
        """
        job_ids = list(
            dict.fromkeys(
                self._registry_job_ids("started_job_registry")
                + self._registry_job_ids("finished_job_registry")
                + self._registry_job_ids("failed_job_registry", newest=FAILED_JOBS_SHOWN)
            )
        )
        return [record for record in self.records.read_many(job_ids, with_results=False) if record is not None]

    def _registry_job_ids(self, registry: str, newest: int | None = None) -> list[str]:
        """Job ids in one RQ registry of every tenant queue; read only (RQ's cleanup is the workers' job)."""
        ids: list[str] = []
        for tenant in self.queue_depths():
            end = -1 if newest is None else newest - 1
            ids += getattr(self._queue(tenant), registry).get_job_ids(0, end, desc=True, cleanup=False)
        return ids


FAILED_JOBS_SHOWN = 50
