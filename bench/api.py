"""Benchmark of the fgs API's enqueue path (no workers: nothing is sampled).

1. Latency and throughput of `POST /v1/generate` with N concurrent clients on loopback, against `GET /healthz`
   under the same load in the same run (the floor of the HTTP stack: the ratio is what enqueueing adds).
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
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from fgs_service.cli import free_port

ROOT = Path(__file__).resolve().parent.parent
COUNTS_CSV = ROOT / "client" / "data" / "imagenet_lt_train_counts.csv"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## bench/api.py"
API_KEY = "bench-key-" + "x" * 24




def start_services(tmp: Path, api_processes: int) -> tuple[list[subprocess.Popen], str, str]:
    redis_port, api_port = free_port(), free_port()
    redis_server = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(FGS_REDIS_URL=redis_url, FGS_DATA_DIR=str(tmp / "data"), FGS_DEV_API_KEY=API_KEY)
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fgs_service.app:create_app", "--factory", "--host", "127.0.0.1", "--port", str(api_port),
         "--workers", str(api_processes), "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "120"],
        env=env,
    )
    base = f"http://127.0.0.1:{api_port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return [api, redis_server], base, redis_url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("API did not start")


async def load(base: str, method: str, path: str, body: dict | None, clients: int, requests: int) -> tuple[list[float], float]:
    """`clients` concurrent connections, `requests` in all; returns per-request latencies (s) and wall time."""
    latencies: list[float] = []
    counter = iter(range(requests))
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in counter:
            began = time.perf_counter()
            response = await client.request(method, path, json=body, headers=headers)
            latencies.append(time.perf_counter() - began)
            if response.status_code >= 300:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(min(clients, 4))))  # warm up connections
        latencies.clear()
        counter = iter(range(requests))
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - began
    return latencies, wall


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


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
            jobs.append({
                "prompt": prompt, "class_index": class_index, "num_images": n, "seed": seed,
                "conditioning_image_ids": [image_ids[(class_index + seed) % len(image_ids)]],
            })
            seed += n
            to_add -= n
    return jobs


async def submit_plan(base: str, jobs: list[dict], chunk: int, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    pending = iter(enumerate(chunks))

    async def sender(client: httpx.AsyncClient) -> None:
        for index, part in pending:
            response = await client.post("/v1/batches", json={"jobs": part}, headers={**headers, "Idempotency-Key": f"plan-{index}"})
            if response.status_code != 202:
                raise RuntimeError(f"batch {index}: {response.status_code} {response.text[:500]}")

    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
    return time.perf_counter() - began


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
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
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--target", type=int, default=1300, help="images per class after balancing (ImageNet-LT max is 1,280)")
    parser.add_argument("--images-per-job", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=500, help="jobs per POST /v1/batches")
    parser.add_argument("--concurrency", type=int, default=2, help="batch POSTs in flight")
    parser.add_argument("--api-processes", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fgs-bench-") as tmp:
        processes, base, redis_url = start_services(Path(tmp), args.api_processes)
        try:
            store = redis.Redis.from_url(redis_url)
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                image_ids = [client.post("/v1/images", files={"file": (f"{i}.png", png(i), "image/png")}).json()["id"] for i in range(16)]
            body = {"prompt": "a photo of a tench", "class_index": 0, "num_images": 8, "conditioning_image_ids": [image_ids[0]]}

            health, health_wall = asyncio.run(load(base, "GET", "/healthz", None, args.clients, args.requests))
            generate, generate_wall = asyncio.run(load(base, "POST", "/v1/generate", body, args.clients, args.requests))
            store.flushdb()  # measure the plan alone

            jobs = build_plan(read_counts(), args.target, args.images_per_job, image_ids)
            images = sum(j["num_images"] for j in jobs)
            store.execute_command("MEMORY", "PURGE")
            before = int(store.info("memory")["used_memory"])
            plan_s = asyncio.run(submit_plan(base, jobs, args.chunk, args.concurrency))
            after = int(store.info("memory")["used_memory"])
            queued_jobs = sum(store.llen(k) for k in store.scan_iter(match="rq:queue:*") if store.type(k) == b"list")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)

    bytes_per_image = (after - before) / images
    rows = [
        ("GET /healthz (baseline)", f"{percentile(health, 50) * 1e3:.1f}", f"{percentile(health, 99) * 1e3:.1f}", f"{len(health) / health_wall:.0f}", "1.00"),
        ("POST /v1/generate (enqueue)", f"{percentile(generate, 50) * 1e3:.1f}", f"{percentile(generate, 99) * 1e3:.1f}", f"{len(generate) / generate_wall:.0f}",
         f"{statistics.median(generate) / statistics.median(health):.2f}"),
    ]
    lines = [
        f"{args.clients} concurrent clients, {args.requests} requests each row, loopback, uvicorn x{args.api_processes}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f} at the end "
        "(other work on the machine counts); load generator on the same machine.",
        "",
        "| request | p50 ms | p99 ms | req/s | p50 vs baseline |",
        "|---|---:|---:|---:|---:|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        "| plan (ImageNet-LT, every class to %d) | value | target |" % args.target,
        "|---|---:|---:|",
        f"| images queued | {images:,} | |",
        f"| jobs ({args.images_per_job} images each, {args.chunk} per POST /v1/batches) | {len(jobs):,} (in queue: {queued_jobs:,}) | |",
        f"| time to queue | {plan_s:.1f} s ({images / plan_s:,.0f} images/s) | <= 300 s |",
        f"| Redis memory | {(after - before) / 2**20:.1f} MiB | |",
        f"| Redis bytes per queued image | {bytes_per_image:.0f} | <= 256 |",
        f"| POST /v1/generate p99 | {percentile(generate, 99) * 1e3:.1f} ms | <= 50 ms |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_results(table)
        print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
