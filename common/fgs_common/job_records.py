"""Job records in Redis: the key layout and the state machine shared by the API and the workers.

A job record is one Redis hash, `{prefix}:job:{id}`, next to (not inside) RQ's own job hash: RQ carries the
work, the record carries what the API reports (state, progress, results, error). Every state change runs as
one Lua script, so the state, the tenant's queued-image count and the jobs-by-state counter move together
and a change from a state the job is no longer in is refused (a canceled job cannot become running).
The client is duck-typed: this module imports neither redis nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from fgs_common.telemetry import counter_field, counter_key
from fgs_common.wire import (
    STORED,
    ErrorBody,
    GenerateRequest,
    ImageResult,
    JobBase,
    JobProgress,
    JobPublic,
    JobState,
)

ACTIVE_STATES = (JobState.queued, JobState.running)


def export_rq_key_prefix() -> str:
    """Put RQ's own keys (queues, job hashes, registries, workers, results) under FGS_REDIS_PREFIX, as
    `{prefix}:rq:...`, so that two deployments on one Redis never see each other's jobs.

    RQ 3.0 reads its key prefix from the environment (RQ_KEY_PREFIX, rq/defaults.py) once, when `rq` is first
    imported; so the fgs_service and fgs_worker packages call this first thing (their `__init__`), before any of
    their modules imports rq, and the processes they start inherit it. An RQ_KEY_PREFIX already set (by the
    operator, or by the parent process) wins: a process's children agree with it; an empty one counts as unset.
    """
    if not os.environ.get("RQ_KEY_PREFIX"):
        os.environ["RQ_KEY_PREFIX"] = f"{os.environ.get('FGS_REDIS_PREFIX') or 'fgs'}:rq"
    return os.environ["RQ_KEY_PREFIX"]


class Keys:
    """Every Redis key fgs writes, derived from one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def request(self, job_id: str) -> str:
        """The job's GenerateRequest JSON, beside the record: a hash whose values all stay under 64 bytes is
        stored compactly by Redis (listpack), which keeps a queued million-image plan small."""
        return f"{self.prefix}:req:{job_id}"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def queued_images(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:queued_images"

    def reservations(self, tenant: str) -> str:
        """Sorted set of the tenant's in-flight enqueue reservations ("token:images", scored by expiry)."""
        return f"{self.prefix}:tenant:{tenant}:reservations"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def idempotency(self, tenant: str, digest: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{digest}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def tenant_queues(self) -> str:
        """Set of the RQ queue names workers serve (one per tenant)."""
        return f"{self.prefix}:queues"

    def queue_name(self, tenant: str) -> str:
        return f"{self.prefix}:{tenant}"

    def model_info(self) -> str:
        """The ModelInfo JSON the workers publish (fgs_worker.runtime.WorkerRuntime.publish_model_info)."""
        return f"{self.prefix}:model"

    def worker_alive(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"

    def worker_alive_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


# KEYS: job hash, tenant queued-image counter, metrics counter hash
# ARGV: new state, comma-separated allowed current states, counter field of the new state,
#       "1" when the new state is terminal, the owner token the record must carry ("" = any owner),
#       then field/value pairs to write
_TRANSITION_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == state then allowed = true end end
if not allowed then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] == '1' then
  local n = tonumber(redis.call('HGET', KEYS[1], 'images_total') or '0')
  local left = redis.call('DECRBY', KEYS[2], n)
  if left < 0 then redis.call('SET', KEYS[2], 0) end
end
redis.call('HINCRBYFLOAT', KEYS[3], ARGV[3], 1)
return 1
"""

# KEYS: job hash. ARGV: owner token, then field/value pairs. Written only while the job runs under that owner.
_PROGRESS_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _pairs(fields: dict[str, Any]) -> list[Any]:
    argv: list[Any] = []
    for name, value in fields.items():
        argv += [name, value if isinstance(value, (str, int, float)) else json.dumps(value)]
    return argv


def utc_now() -> datetime:
    return datetime.now(UTC)


class JobRecords:
    """Reads and changes job records. `redis` is a redis-py client (decode_responses=True)."""

    def __init__(self, redis: Any, prefix: str, record_ttl_s: int = 30 * 24 * 3600):
        self.redis = redis
        self.keys = Keys(prefix)
        self.record_ttl_s = record_ttl_s
        self._transition = redis.register_script(_TRANSITION_LUA)
        self._progress = redis.register_script(_PROGRESS_LUA)

    # ---- creation (inside the caller's pipeline, with the RQ enqueue) ----
    def create(
        self, pipe: Any, job_id: str, tenant: str, request: GenerateRequest, batch_id: str | None, now: float
    ) -> None:
        """Write a new queued record into `pipe` (the caller executes it together with the enqueue)."""
        fields = {
            "tenant": tenant,
            "state": JobState.queued.value,
            "criterion": request.criterion.value,
            "images_total": request.num_images,
            "created_at": round(now, 3),
        }
        if batch_id:
            fields["batch_id"] = batch_id
        fields["batch_key"] = shared_batch_key(request, tenant)
        pipe.hset(self.keys.job(job_id), mapping=fields)
        pipe.expire(self.keys.job(job_id), self.record_ttl_s)
        # exclude_defaults keeps big plans small (bench/api.py measures bytes per queued image)
        pipe.set(self.keys.request(job_id), request.model_dump_json(exclude_defaults=True), ex=self.record_ttl_s)
        pipe.zadd(self.keys.tenant_jobs(tenant), {job_id: now})
        pipe.hincrbyfloat(
            counter_key(self.keys.prefix),
            counter_field("jobs", {"tenant": tenant, "criterion": request.criterion.value, "status": "queued"}),
            1,
        )

    # ---- state changes ----
    def transition(
        self, job_id: str, new: JobState, allowed: tuple[JobState, ...], expect_owner: str = "", **fields: Any
    ) -> bool:
        """Move the job to `new` if it is in one of `allowed` (and, with `expect_owner`, still carries that
        owner token); write `fields` in the same step. False if refused.

        The owner token is the fence: a worker claims a job with a token of its own (field `owner`) and passes
        it on every later write, so a worker that lost the job (paused past the abandon time while another
        took it over) can change nothing any more.
        """
        tenant, criterion = self.redis.hmget(self.keys.job(job_id), "tenant", "criterion")
        if tenant is None:
            return False
        argv: list[Any] = [
            new.value,
            ",".join(s.value for s in allowed),
            counter_field("jobs", {"tenant": tenant, "criterion": criterion, "status": new.value}),
            "1" if new.is_terminal else "0",
            expect_owner,
        ]
        argv += _pairs(fields)
        keys = [self.keys.job(job_id), self.keys.queued_images(tenant), counter_key(self.keys.prefix)]
        return self._transition(keys=keys, args=argv) == 1

    def set_progress(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Write progress fields of a running job owned by `owner`; False (nothing written) if it lost the job."""
        return self._progress(keys=[self.keys.job(job_id)], args=[owner, *_pairs(fields)]) == 1

    def queue_progress(self, pipe: Any, job_id: str, owner: str, **fields: Any) -> None:
        """`set_progress` appended to `pipe` (one round trip for the jobs of a shared batch); its reply is 1 when
        written, 0 when the job was lost."""
        self._progress(keys=[self.keys.job(job_id)], args=[owner, *_pairs(fields)], client=pipe)

    # ---- reads ----
    def raw(self, job_id: str) -> dict[str, str]:
        """The record's fields plus 'request' (the GenerateRequest JSON); {} when there is no such job."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.get(self.keys.request(job_id))
            fields, request = pipe.execute()
        if fields and request:
            fields["request"] = request
        return fields if fields and request else {}

    def tenant_of(self, job_id: str) -> str | None:
        return self.redis.hget(self.keys.job(job_id), "tenant")

    def summaries(self, job_ids: list[str], *fields: str) -> dict[str, list[str | None]]:
        """`fields` of each job's record, in one round trip (None where a field or the record is missing)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.keys.job(job_id), *fields)
            return dict(zip(job_ids, pipe.execute(), strict=True))


def shared_batch_key(request: GenerateRequest, tenant: str) -> str:
    """A short digest of `request.shared_batch_key`: jobs of equal digests may share one sampler call
    (fgs_worker.shared_batch). 16 hex digits keep the record's hash compact (under 64 bytes a value)."""
    return hashlib.sha256(repr(request.shared_batch_key(tenant)).encode()).hexdigest()[:16]


def _ts(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


def job_base(job_id: str, raw: dict[str, str]) -> JobBase:
    """The wire view of one stored record without its results (a record read without them will do)."""
    return JobBase(
        job_id=job_id,
        state=JobState(raw["state"]),
        request=GenerateRequest.model_validate_json(raw["request"], context=STORED),
        progress=JobProgress(
            images_done=int(raw.get("images_done", 0)),
            images_total=int(raw.get("images_total", 0)),
            step=int(raw.get("step", 0)),
            steps_total=int(raw.get("steps_total", 0)),
        ),
        error=ErrorBody.model_validate_json(raw["error"]) if raw.get("error") else None,
        batch_id=raw.get("batch_id") or None,
        created_at=_ts(raw.get("created_at")) or utc_now(),
        started_at=_ts(raw.get("started_at")),
        finished_at=_ts(raw.get("finished_at")),
    )


def job_public(job_id: str, raw: dict[str, str]) -> JobPublic:
    """The wire view of one stored record, with its results."""
    results = [ImageResult.model_validate(r) for r in json.loads(raw.get("results", "[]"))]
    return JobPublic(**dict(job_base(job_id, raw)), results=results)


def now_ts() -> float:
    return time.time()
