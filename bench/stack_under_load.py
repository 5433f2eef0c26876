"""What bench/load.py and bench/soak.py share: a whole fgs stack on loopback, concurrent clients, and the audit.

- `LocalStack`: a private redis-server (AOF, appendfsync everysec, in a temporary directory), uvicorn and N
  workers on the tiny model, all on 127.0.0.1; it restarts a worker that exits (as `fgs up` does) and offers
  the faults the soak injects (SIGKILL or SIGSTOP a worker, restart Redis).
- `run_clients`: C asyncio clients for a given time. Each submits a small job, follows it (half by SSE, half by
  polling its status, with a job list now and then), downloads its images and checks they are PNGs; every
  answer's status is logged with its time.
- `audit`: every accepted job finished exactly once, every reported image on disk exactly once, no orphan files,
  no 5xx but 503s inside the declared outage windows, the tenant counters equal to what is queued.

Bounded on purpose: loopback only, hard time limits on every phase, a fixed number of clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from fgs_common.job_records import Keys
from fgs_common.loopback import free_port
from fgs_common.telemetry import counter_key, parse_counter_field
from fgs_lab.live_stack import spawn_api, spawn_worker, wait_until_serving
from fgs_service.redis_server import start_redis_server, stop_redis_server

TENANTS = {f"team{i}": f"load-key-team{i}-" + "k" * 24 for i in range(4)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# How long a client follows one job before it gives up on it (the audit then reports the job unfinished).
FOLLOW_S = 900.0


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load {load:.1f} at start"


class LocalStack:
    """redis-server + uvicorn + workers on loopback, in a temporary directory removed by `close`."""

    def __init__(self, workers: int = 2, env: dict[str, str] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="fgs-bench-"))
        self.redis_port, self.api_port = free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.prefix = "fgs-bench"
        self.data_dir = self.root / "data"
        from fgs_service.auth import hash_key

        keys = {"tenants": [{"name": n, "key_sha256": [hash_key(k)]} for n, k in TENANTS.items()]}
        (self.root / "keys.json").write_text(json.dumps(keys))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
        self.env.update(
            FGS_REDIS_URL=self.redis_url,
            FGS_REDIS_PREFIX=self.prefix,
            FGS_DATA_DIR=str(self.data_dir),
            FGS_API_KEYS_FILE=str(self.root / "keys.json"),
            FGS_MODEL="tiny",
            FGS_DEVICE="cpu",
            FGS_HEARTBEAT_S="1",
            OMP_NUM_THREADS="1",
            **(env or {}),
        )
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.redis_process = self._start_redis()
        self.api = spawn_api(self.env, self.api_port, self.logs / "api.log", "--timeout-keep-alive", "120")
        self.workers: list[subprocess.Popen] = []
        self.worker_restarts = 0
        for _ in range(workers):
            self.workers.append(self._spawn_worker(len(self.workers)))
        self.wait_ready(workers)

    def _spawn_worker(self, index: int) -> subprocess.Popen:
        return spawn_worker(self.env, f"w{index}-{self.worker_restarts}", self.logs / f"worker-{index}.log")

    def _start_redis(self) -> subprocess.Popen:
        """AOF (appendfsync everysec) in our folder, on our port: a restart finds every queued job."""
        return start_redis_server(self.root / "redis", port=self.redis_port)[0]

    def wait_ready(self, workers: int, timeout: float = 300) -> None:
        wait_until_serving(self.base_url, [self.api], timeout, self.redis_url, self.prefix, workers)

    # ---- supervision and faults ----
    def restart_dead_workers(self) -> None:
        for index, process in enumerate(self.workers):
            if process.poll() is not None:
                self.worker_restarts += 1
                self.workers[index] = self._spawn_worker(index)

    def kill_worker(self, index: int) -> None:
        self.workers[index].send_signal(signal.SIGKILL)
        self.workers[index].wait()

    def restart_redis(self) -> tuple[float, float]:
        """SIGTERM (Redis writes its AOF) and start again on the same port and directory; the outage window."""
        began = time.time()
        self.redis_process.send_signal(signal.SIGTERM)
        self.redis_process.wait(timeout=60)
        time.sleep(2.0)  # a real outage lasts a while
        self.redis_process = self._start_redis()
        return began, time.time()

    def close(self, keep_logs: Path | None = None) -> None:
        """Stop everything and remove the folder; keep_logs: copy the processes' logs there first."""
        for process in [*self.workers, self.api]:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.api]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stop_redis_server(self.redis_process)
        if keep_logs is not None:
            shutil.copytree(self.logs, keep_logs, dirs_exist_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class LoadLog:
    """What the clients saw."""

    accepted: dict[str, str] = field(default_factory=dict)  # job id -> tenant
    statuses: list[tuple[float, str, int]] = field(default_factory=list)  # (time, operation, status)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    transport_errors: Counter = field(default_factory=Counter)
    bad_images: int = 0
    seeds: set[int] = field(default_factory=set)

    def note(self, operation: str, status: int, began: float) -> None:
        now = time.time()
        self.statuses.append((now, operation, status))
        if status < 500:
            self.latencies[operation].append(now - began)


async def _client(number: int, stack: LocalStack, until: float, log: LoadLog, job_size: dict) -> None:
    tenant = list(TENANTS)[number % len(TENANTS)]
    follow_by_sse = number % 2 == 0
    rng = random.Random(number)
    headers = {"Authorization": f"Bearer {TENANTS[tenant]}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as http:

        async def call(operation: str, method: str, url: str, **kwargs) -> httpx.Response | None:
            began = time.time()
            try:
                response = await http.request(method, url, **kwargs)
            except httpx.HTTPError as error:
                log.transport_errors[type(error).__name__] += 1
                await asyncio.sleep(1.0)
                return None
            log.note(operation, response.status_code, began)
            if response.status_code == 503:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            return response

        submitted = 0
        while time.time() < until:
            # Distinct seeds, 2 apart (a job has at most 2 images, image i uses seed + i), so no two jobs make the
            # same pixels: images are stored by content, and the audit counts an id reported twice as a defect.
            # (Random seeds collided twice in the 28 Nov soak, which the audit then reported.)
            seed = number * 1_000_000 + 2 * submitted
            submitted += 1
            body = {
                "prompt": "a digit",
                "class_index": rng.randrange(10),
                "seed": seed,
                **job_size,
                "num_images": rng.choice((1, 1, 2)),
            }
            response = await call("submit", "POST", "/v1/generate", json=body)
            if response is None or response.status_code != 202:
                continue
            job_id = response.json()["job_id"]
            log.accepted[job_id] = tenant
            log.seeds.add(seed)
            state, results = await _follow(http, call, job_id, follow_by_sse, log)
            for result in results:
                image = await call("download", "GET", f"/v1/images/{result['image_id']}")
                if image is not None and image.status_code == 200 and not image.content.startswith(PNG_MAGIC):
                    log.bad_images += 1
            if rng.random() < 0.2:
                await call("list", "GET", "/v1/jobs", params={"limit": 20})


async def _follow(http, call, job_id: str, by_sse: bool, log: LoadLog, follow_s: float = FOLLOW_S) -> tuple[str, list]:
    """Until the job is final, or ("unknown", []) after `follow_s`: by SSE (reconnecting after an `error` event)
    or by polling. The deadline holds inside a stream too: one that only sends keep-alives (a job nobody ends)
    never returns on its own, and its client would never let the run reach its audit."""
    deadline = time.time() + follow_s
    while time.time() < deadline:
        if by_sse:
            began = time.time()
            try:
                async with asyncio.timeout(deadline - time.time()):
                    async with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as stream:
                        log.note("events", stream.status_code, began)
                        last = None
                        async for line in stream.aiter_lines():
                            if line.startswith("data: "):
                                last = json.loads(line[6:])
                if last is not None and last.get("state") in ("finished", "failed", "canceled"):
                    return last["state"], last.get("results", [])
            except TimeoutError:
                break
            except httpx.HTTPError as error:
                log.transport_errors[type(error).__name__] += 1
            await asyncio.sleep(1.0)
        else:
            response = await call("status", "GET", f"/v1/jobs/{job_id}")
            if response is not None and response.status_code == 200:
                job = response.json()
                if job["state"] in ("finished", "failed", "canceled"):
                    return job["state"], job["results"]
            await asyncio.sleep(1.0)
    return "unknown", []


async def _run(stack: LocalStack, clients: int, seconds: float, log: LoadLog, job_size: dict) -> None:
    until = time.time() + seconds
    # clients stop submitting at `until` and finish following the job in hand
    await asyncio.gather(*(_client(i, stack, until, log, job_size) for i in range(clients)))


def run_clients(stack: LocalStack, clients: int, seconds: float, job_size: dict) -> LoadLog:
    log = LoadLog()
    asyncio.run(_run(stack, clients, seconds, log, job_size))
    return log


def wait_drained(stack: LocalStack, log: LoadLog, timeout: float = 600) -> bool:
    """Until every accepted job is final (workers restarted as needed)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        stack.restart_dead_workers()
        with client.pipeline(transaction=False) as pipe:
            for job_id in log.accepted:
                pipe.hget(f"{stack.prefix}:job:{job_id}", "state")
            states = pipe.execute()
        if all(s in ("finished", "failed", "canceled") for s in states):
            return True
        time.sleep(1.0)
    return False


def audit(stack: LocalStack, log: LoadLog, outages: list[tuple[float, float]] = (), grace_s: float = 10.0) -> dict:
    """The checks of issue 10's benchmarks; returns the findings (each list empty when all is well)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    findings: dict[str, list] = defaultdict(list)
    reported: Counter = Counter()
    finished_by_tenant: Counter = Counter()
    for job_id, tenant in log.accepted.items():
        record = client.hgetall(f"{stack.prefix}:job:{job_id}")
        if not record:
            findings["accepted job lost"].append(job_id)
            continue
        if record["state"] != "finished":
            findings["accepted job not finished"].append(f"{job_id}: {record['state']} {record.get('error', '')[:200]}")
            continue
        finished_by_tenant[tenant] += 1
        results = [json.loads(entry) for entry in client.lrange(Keys(stack.prefix).results(job_id), 0, -1)]
        if len(results) != int(record["images_total"]):
            findings["wrong image count"].append(job_id)
        for result in results:
            reported[(tenant, result["image_id"])] += 1
    # finished exactly once: the state counter moved to `finished` once per job (the Lua transition counts it)
    counters = [(*parse_counter_field(k), float(v)) for k, v in client.hgetall(counter_key(stack.prefix)).items()]
    for tenant in TENANTS:
        total = sum(
            v
            for name, labels, v in counters
            if name == "jobs" and labels.get("tenant") == tenant and labels.get("status") == "finished"
        )
        if int(total) != finished_by_tenant[tenant]:
            findings["finished counted more or less than once"].append(
                f"{tenant}: {total} != {finished_by_tenant[tenant]}"
            )
    findings["image reported twice"] = [f"{t}/{i}" for (t, i), n in reported.items() if n > 1]
    on_disk = set()
    for tenant in TENANTS:
        folder = stack.data_dir / "tenants" / tenant / "images"
        if folder.exists():
            on_disk |= {(tenant, p.stem) for p in folder.iterdir() if not p.name.startswith(".")}
    findings["reported image missing on disk"] = [f"{t}/{i}" for t, i in set(reported) - on_disk]
    findings["orphan file"] = [f"{t}/{i}" for t, i in on_disk - set(reported)]
    for moment, operation, status in log.statuses:
        if status >= 500:
            inside = any(start - 1 <= moment <= end + grace_s for start, end in outages)
            if not (status == 503 and inside):
                findings["5xx outside an outage"].append(f"{operation} {status} at {moment:.1f}")
    for tenant in TENANTS:
        queued = 0
        for job_id, owner in log.accepted.items():
            if owner == tenant and client.hget(f"{stack.prefix}:job:{job_id}", "state") in ("queued", "running"):
                queued += int(client.hget(f"{stack.prefix}:job:{job_id}", "images_total"))
        counter = int(client.get(f"{stack.prefix}:tenant:{tenant}:queued_images") or 0)
        if counter != queued:
            findings["tenant counter != queued images"].append(f"{tenant}: {counter} != {queued}")
    if log.bad_images:
        findings["download not a PNG"].append(str(log.bad_images))
    return {k: v for k, v in findings.items() if v}


def summary(log: LoadLog, seconds: float) -> dict:
    codes = Counter(status for _, _, status in log.statuses)
    latency = {}
    for operation, values in sorted(log.latencies.items()):
        values = sorted(values)
        if values:
            latency[operation] = {
                "n": len(values),
                "p50_ms": round(1000 * values[len(values) // 2]),
                "p99_ms": round(1000 * values[min(len(values) - 1, int(len(values) * 0.99))]),
            }
    finished_rate = len(log.accepted) / seconds if seconds else 0
    return {
        "accepted_jobs": len(log.accepted),
        "accepted_per_s": round(finished_rate, 2),
        "status_codes": dict(codes),
        "transport_errors": dict(log.transport_errors),
        "latency": latency,
    }


def images_generated(stack: LocalStack) -> int:
    counters = redis.Redis.from_url(stack.redis_url, decode_responses=True).hgetall(counter_key(stack.prefix))
    return int(sum(float(v) for k, v in counters.items() if parse_counter_field(k)[0] == "images_generated"))
