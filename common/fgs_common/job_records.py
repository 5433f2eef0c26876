"""Job records in Redis: the key layout and the state machine shared by the API and the workers.

A job record is a Redis hash, `{prefix}:job:{id}`, with its request and its results list beside it, next to (not
inside) RQ's own job hash: RQ carries the work, the record carries what the API reports (state, progress,
results, error). Every state change runs as one Lua script, so the state, the tenant's queued-image count and the
jobs-by-state counter move together and a change from a state the job is no longer in is refused (a canceled job
cannot become running). Results are appended after each chunk (`queue_progress`), never rewritten as a whole.
Reads return a `JobRecord` (fgs_common.job_record), parsed here once.
The client is duck-typed: this module imports neither redis nor torch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

from fgs_common.job_record import JobRecord
from fgs_common.telemetry import counter_field, counter_key
from fgs_common.wire import GenerateRequest, ImageResult, JobState

ACTIVE_STATES = (JobState.queued, JobState.running)


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

    def results(self, job_id: str) -> str:
        """The job's results: a list of ImageResult JSONs, one per image written, appended after each chunk."""
        return f"{self.prefix}:results:{job_id}"

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


# KEYS: job hash, tenant queued-image counter, metrics counter hash, results list
# ARGV: new state, comma-separated allowed current states, counter field of the new state,
#       "1" when the new state is terminal, the owner token the record must carry ("" = any owner),
#       "1" to empty the results list (and the earlier layout's results field), then field/value pairs to write
_TRANSITION_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == state then allowed = true end end
if not allowed then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
if ARGV[6] == '1' then redis.call('DEL', KEYS[4]); redis.call('HDEL', KEYS[1], 'results') end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] == '1' then
  local n = tonumber(redis.call('HGET', KEYS[1], 'images_total') or '0')
  local left = redis.call('DECRBY', KEYS[2], n)
  if left < 0 then redis.call('SET', KEYS[2], 0) end
end
redis.call('HINCRBYFLOAT', KEYS[3], ARGV[3], 1)
return 1
"""

# KEYS: job hash, results list. ARGV: owner token, the index the new results start at ("" = no results), their
# count n, the n results, then field/value pairs. Written only while the job runs under that owner. The results
# go to their index (what lies at or past it is dropped first: a sampler call that failed after reporting is
# sampled again), and the list lives as long as the record.
_PROGRESS_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  local from = tonumber(ARGV[2])
  if from == 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, from - 1) end
  if n > 0 then
    redis.call('RPUSH', KEYS[2], unpack(ARGV, 4, 3 + n))
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
for i = 4 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _pairs(fields: dict[str, Any]) -> list[Any]:
    argv: list[Any] = []
    for name, value in fields.items():
        argv += [name, value if isinstance(value, (str, int, float)) else json.dumps(value)]
    return argv


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
        self,
        job_id: str,
        new: JobState,
        allowed: tuple[JobState, ...],
        expect_owner: str = "",
        clear_results: bool = False,
        **fields: Any,
    ) -> bool:
        """Move the job to `new` if it is in one of `allowed` (and, with `expect_owner`, still carries that
        owner token); write `fields` (and with `clear_results` empty its results) in the same step. False if
        refused.

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
            "1" if clear_results else "0",
        ]
        argv += _pairs(fields)
        keys = [
            self.keys.job(job_id),
            self.keys.queued_images(tenant),
            counter_key(self.keys.prefix),
            self.keys.results(job_id),
        ]
        return self._transition(keys=keys, args=argv) == 1

    def set_progress(
        self, job_id: str, owner: str, results_from: int | None = None, results: Sequence[ImageResult] = (), **fields
    ) -> bool:
        """Write progress `fields` of a running job owned by `owner`, and with `results_from` its `results` at that
        index of its results list (what lay at or past it is dropped); False (nothing written) if it lost the job."""
        return self._progress(**self._progress_call(job_id, owner, results_from, results, fields)) == 1

    def adopt_earlier_results(self, job_id: str, owner: str, results: Sequence[ImageResult]) -> bool:
        """A record of the earlier layout (before 6 Dec 2026 its results were one JSON array in the hash's `results`
        field) that resumes under `owner`: `results` (as read) into its list, the field deleted, in one MULTI.
        False when the record has no such field (nothing to do)."""
        if not self.redis.hexists(self.keys.job(job_id), "results"):
            return False
        with self.redis.pipeline(transaction=True) as pipe:
            self.queue_progress(pipe, job_id, owner, results_from=0, results=results)
            pipe.hdel(self.keys.job(job_id), "results")
            pipe.execute()
        return True

    def queue_progress(
        self,
        pipe: Any,
        job_id: str,
        owner: str,
        results_from: int | None = None,
        results: Sequence[ImageResult] = (),
        **fields: Any,
    ) -> None:
        """`set_progress` appended to `pipe` (one round trip for the jobs of a shared batch); its reply is 1 when
        written, 0 when the job was lost."""
        self._progress(**self._progress_call(job_id, owner, results_from, results, fields), client=pipe)

    def _progress_call(
        self, job_id: str, owner: str, results_from: int | None, results: Sequence[ImageResult], fields: dict
    ) -> dict[str, list]:
        added = [result.model_dump_json() for result in results]
        start = "" if results_from is None else results_from
        args = [owner, start, len(added), *added, *_pairs(fields)]
        return {"keys": [self.keys.job(job_id), self.keys.results(job_id)], "args": args}

    # ---- reads ----
    def read(self, job_id: str, with_results: bool = True) -> JobRecord | None:
        """The job's record (without its results list unless `with_results`); None when there is no such job."""
        return self.read_many([job_id], with_results)[0]

    def read_many(self, job_ids: list[str], with_results: bool = True) -> list[JobRecord | None]:
        """`read` for many jobs in one round trip; None for a job that no longer exists."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
                pipe.get(self.keys.request(job_id))
                if with_results:
                    pipe.lrange(self.keys.results(job_id), 0, -1)
            replies = pipe.execute()
        width = 3 if with_results else 2
        records: list[JobRecord | None] = []
        for i, job_id in enumerate(job_ids):
            fields, request = replies[width * i], replies[width * i + 1]
            results = replies[width * i + 2] if with_results else None
            records.append(JobRecord.parse(job_id, fields, request, results) if fields and request else None)
        return records

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


def now_ts() -> float:
    return time.time()
