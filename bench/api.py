"""Benchmark of the fgs API's enqueue path (no workers: nothing is sampled).

1. Latency and throughput of `POST /v1/generate` with N concurrent clients on loopback, against `GET /healthz`
   under the same load in the same run (the floor of the HTTP stack: the ratio is what enqueueing adds).
   The load comes from wrk (Debian package `wrk`): a Python load generator on the same 2 cores took more CPU
   than the server and measured itself.
2. Time to submit an ImageNet-LT balancing plan (every class topped up to --target images, ~1.18 M images at
   1,300) through `POST /v1/batches`, in jobs of --images-per-job images (the client's default, 8), and the Redis
   memory the queued plan holds per queued image (INFO used_memory before and after).

Targets: p99 <= 50 ms, plan queued in <= 5 minutes, <= 256 bytes of Redis per queued image.
Prints a table and writes it to bench/RESULTS.md under "## bench/api.py" (other sections are kept).

    .venv/bin/python bench/api.py                 # full run (a few minutes)
    .venv/bin/python bench/api.py --target 200    # smaller plan, quick look
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from fgs_common.loopback import free_port
from fgs_lab.live_stack import spawn_api, wait_until_serving
from fgs_service.redis_server import start_redis_server

ROOT = Path(__file__).resolve().parent.parent
COUNTS_CSV = ROOT / "client" / "fgs_client" / "data" / "imagenet_lt_train_counts.csv"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## bench/api.py"
API_KEY = "bench-key-" + "x" * 24


def start_services(tmp: Path, api_processes: int) -> tuple[list[subprocess.Popen], str, str]:
    api_port = free_port()
    redis_server, redis_url = start_redis_server()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(FGS_REDIS_URL=redis_url, FGS_DATA_DIR=str(tmp / "data"), FGS_DEV_API_KEY=API_KEY)
    options = ("--workers", str(api_processes), "--no-access-log", "--timeout-keep-alive", "120")
    api = spawn_api(env, api_port, None, *options)
    base = f"http://127.0.0.1:{api_port}"
    wait_until_serving(base, [api], timeout_s=30)
    return [api, redis_server], base, redis_url


WRK_SCRIPT = """
wrk.method = %(method)s
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = %(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FGS_RESULT %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class Load:
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    per_s: float


def lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def load(base: str, method: str, path: str, body: dict | None, clients: int, seconds: int, tmp: Path) -> Load:
    """`clients` keep-alive connections, each sending its next request as soon as the last one is answered, for
    `seconds`; driven by wrk (C, one thread) so that the load generator takes little of the CPU it measures."""
    script = tmp / "wrk.lua"
    script.write_text(
        WRK_SCRIPT
        % {
            "method": lua_string(method),
            "body": lua_string(json.dumps(body)) if body else "nil",
            "auth": lua_string(f"Bearer {API_KEY}"),
        }
    )

    def wrk(duration_s: int) -> str:
        command = ["wrk", "-t1", f"-c{clients}", f"-d{duration_s}s", "--timeout", "10s", "-s", str(script), base + path]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    wrk(2)  # warm up: connections, caches, the first requests' imports
    out = wrk(seconds)
    fields = next(line for line in out.splitlines() if line.startswith("FGS_RESULT")).split()[1:]
    requests, duration_us, p50, p99, longest, bad_status, socket_errors = map(int, fields)
    if bad_status or socket_errors:
        raise RuntimeError(f"{method} {path}: {bad_status} non-2xx answers, {socket_errors} socket errors under load")
    return Load(p50 / 1e3, p99 / 1e3, longest / 1e3, requests, requests / (duration_us / 1e6))


def read_counts() -> list[tuple[int, str, int]]:
    with COUNTS_CSV.open() as f:
        return [(int(r["class_index"]), r["name"], int(r["train_count"])) for r in csv.DictReader(f)]


def build_plan(counts, target: int, images_per_job: int, image_ids: list[str]) -> list[dict]:
    jobs = []
    for class_index, name, count in counts:
        to_add = max(0, target - count)
        prompt = f"a photo of a {name.split(' ')[0]}"
        seed = 0
        while to_add > 0:
            n = min(images_per_job, to_add)
            jobs.append(
                {
                    "prompt": prompt,
                    "class_index": class_index,
                    "num_images": n,
                    "seed": seed,
                    "conditioning_image_ids": [image_ids[(class_index + seed) % len(image_ids)]],
                }
            )
            seed += n
            to_add -= n
    return jobs


async def submit_plan(base: str, jobs: list[dict], chunk: int, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    pending = iter(enumerate(chunks))

    async def sender(client: httpx.AsyncClient) -> None:
        for index, part in pending:
            response = await client.post(
                "/v1/batches", json={"jobs": part}, headers={**headers, "Idempotency-Key": f"plan-{index}"}
            )
            if response.status_code != 202:
                raise RuntimeError(f"batch {index}: {response.status_code} {response.text[:500]}")

    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
    return time.perf_counter() - began


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def write_results(table: str) -> None:
    section = f"{HEADING}\n\n{table}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=15, help="length of each load run")
    parser.add_argument(
        "--target", type=int, default=1300, help="images per class after balancing (ImageNet-LT max is 1,280)"
    )
    parser.add_argument("--images-per-job", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=500, help="jobs per POST /v1/batches")
    parser.add_argument("--concurrency", type=int, default=2, help="batch POSTs in flight")
    parser.add_argument(
        "--api-processes", default="1,2", help="uvicorn worker process counts to measure (comma-separated)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/api.py drives the load with wrk: apt-get install wrk")

    process_counts = [int(n) for n in args.api_processes.split(",")]
    latency_rows = []  # (uvicorn processes, healthz Load, generate Load)
    with tempfile.TemporaryDirectory(prefix="fgs-bench-") as tmp:
        for count in process_counts:
            processes, base, redis_url = start_services(Path(tmp), count)
            try:
                store = redis.Redis.from_url(redis_url)
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                    image_ids = [
                        client.post("/v1/images", files={"file": (f"{i}.png", png(i), "image/png")}).json()["image_id"]
                        for i in range(16)
                    ]
                body = {
                    "prompt": "a photo of a tench",
                    "class_index": 0,
                    "num_images": 8,
                    "conditioning_image_ids": [image_ids[0]],
                }
                health = load(base, "GET", "/healthz", None, args.clients, args.seconds, Path(tmp))
                generate = load(base, "POST", "/v1/generate", body, args.clients, args.seconds, Path(tmp))
                latency_rows.append((count, health, generate))
                if count != process_counts[-1]:
                    continue
                time.sleep(1)  # wrk stops sending at its deadline; let the requests still in the server finish
                store.flushdb()  # measure the plan alone

                jobs = build_plan(read_counts(), args.target, args.images_per_job, image_ids)
                images = sum(j["num_images"] for j in jobs)
                store.execute_command("MEMORY", "PURGE")
                before = int(store.info("memory")["used_memory"])
                plan_s = asyncio.run(submit_plan(base, jobs, args.chunk, args.concurrency))
                after = int(store.info("memory")["used_memory"])
                queued_jobs = sum(  # RQ's queues, under whatever RQ_KEY_PREFIX the stack runs with
                    store.llen(k) for k in store.scan_iter(match="*rq:queue:*") if store.type(k) == b"list"
                )
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(timeout=30)

    bytes_per_image = (after - before) / images
    rows = []
    for count, health, generate in latency_rows:
        rows.append((count, "GET /healthz (baseline)", health, 1.0))
        rows.append((count, "POST /v1/generate (enqueue)", generate, generate.p50_ms / health.p50_ms))
    lines = [
        f"{args.clients} concurrent keep-alive clients for {args.seconds} s per row (wrk, one thread; each "
        "client sends its next "
        f"request when the last is answered), loopback, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}) shared by "
        f"uvicorn, Redis and wrk, load average {os.getloadavg()[0]:.1f} at the end (other work on the machine counts). "
        "Ratios against the healthz baseline of the same server.",
        "",
        "| uvicorn processes | request | p50 ms | p99 ms | max ms | requests | req/s | p50 vs baseline |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {count} | {name} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.0f} | {r.requests:,} | "
            f"{r.per_s:,.0f} | {ratio:.2f} |"
            for count, name, r, ratio in rows
        ],
        "",
        f"| plan (ImageNet-LT, every class to {args.target}; uvicorn x{process_counts[-1]}) | value | target |",
        "|---|---:|---:|",
        f"| images queued | {images:,} | |",
        f"| jobs ({args.images_per_job} images each, {args.chunk} per POST /v1/batches) | {len(jobs):,} (in "
        f"queue: {queued_jobs:,}) | |",
        f"| time to queue | {plan_s:.1f} s ({images / plan_s:,.0f} images/s) | <= 300 s |",
        f"| Redis memory | {(after - before) / 2**20:.1f} MiB | |",
        f"| Redis bytes per queued image | {bytes_per_image:.0f} | <= 256 |",
        *[
            f"| POST /v1/generate p99, uvicorn x{count} | {generate.p99_ms:.1f} ms | <= 50 ms |"
            for count, _, generate in latency_rows
        ],
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_results(table)
        print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
