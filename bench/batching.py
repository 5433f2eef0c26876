"""Cross-job batching (issue 15): 64 one-image jobs from 4 tenants, submitted at once to one worker on loopback.

Measured three ways in one run, each on a fresh stack (redis-server, uvicorn, one worker on the tiny model), after
one warm-up job:
  without   FGS_BATCH_ACROSS_JOBS=0: every job is its own sampler call (batch 1), as before issue 15
  with      FGS_BATCH_ACROSS_JOBS=1: a job's call is filled with queued jobs, up to FGS_MAX_BATCH_IMAGES=8
  ceiling   the same 64 images as eight 8-image jobs: in-job batching, the most batching can give
Prints images/s, the ratios (targets: with >= 0.8x the ceiling and >= 1.5x without), where the worker's time
went (sampler calls against everything else: claims, records, PNG writes), and the tenants' completion order
(interleaved: no tenant's last job finishes before every other tenant's first job starts).

    .venv/bin/python bench/batching.py            # the issue's run (about 2 minutes on 2 idle cores)
    .venv/bin/python bench/batching.py --steps 5  # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).parent))
from stack_under_load import TENANTS, LocalStack, machine  # noqa: E402

from fgs_common.telemetry import histogram_key  # noqa: E402

JOBS_PER_TENANT = 16  # x 4 tenants = 64 one-image jobs


def submit(stack: LocalStack, tenant: str, jobs: list[dict]) -> list[str]:
    headers = {"Authorization": f"Bearer {TENANTS[tenant]}"}
    response = httpx.post(f"{stack.base_url}/v1/batches", json={"jobs": jobs}, headers=headers, timeout=60)
    response.raise_for_status()
    return response.json()["job_ids"]


def wait_finished(stack: LocalStack, job_ids: list[str], timeout: float) -> list[dict[str, str]]:
    """The records of `job_ids` once every one is final (read straight from Redis: no API in the measurement)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    fields = ("tenant", "state", "started_at", "finished_at")
    deadline = time.time() + timeout
    while True:
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(f"{stack.prefix}:job:{job_id}", *fields)
            records = [dict(zip(fields, values, strict=True)) for values in pipe.execute()]
        if all(r["state"] in ("finished", "failed", "canceled") for r in records):
            return records
        if time.time() > deadline:
            raise TimeoutError(f"jobs not final after {timeout} s")
        time.sleep(0.1)


def histogram(stack: LocalStack, name: str) -> tuple[int, float]:
    """(count, sum) of a worker histogram so far."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    count, total = client.hmget(histogram_key(stack.prefix, name), "count", "sum")
    return int(count or 0), float(total or 0)


def measure(mode: str, steps: int, timeout: float) -> dict:
    """One mode on a stack of its own: warm up, submit every tenant's jobs at once, wait, read the records."""
    across = "0" if mode == "without" else "1"
    stack = LocalStack(workers=1, env={"FGS_BATCH_ACROSS_JOBS": across, "FGS_MAX_BATCH_IMAGES": "8"})
    try:
        job = {"prompt": "a digit", "class_index": 1, "num_images": 1, "steps": steps, "guidance_every": 1}
        wait_finished(stack, submit(stack, "team0", [dict(job, seed=10_000)]), timeout)  # warm-up
        sampling_before = histogram(stack, "sampling_seconds")[1]
        calls_before = histogram(stack, "batch_size")[0]
        tenants = sorted(TENANTS)
        if mode == "ceiling":  # the same 64 images (seeds) as eight 8-image jobs, two per tenant
            plans = {t: [dict(job, num_images=8, seed=16 * i + 8 * k) for k in range(2)] for i, t in enumerate(tenants)}
        else:
            plans = {t: [dict(job, seed=16 * i + k) for k in range(JOBS_PER_TENANT)] for i, t in enumerate(tenants)}
        load = os.getloadavg()[0]
        began = time.time()
        with ThreadPoolExecutor(len(tenants)) as pool:  # every tenant at once
            ids = [i for batch in pool.map(lambda t: submit(stack, t, plans[t]), tenants) for i in batch]
        records = wait_finished(stack, ids, timeout)
        ended = max(float(r["finished_at"]) for r in records)
        sampling_s = histogram(stack, "sampling_seconds")[1] - sampling_before
        calls = histogram(stack, "batch_size")[0] - calls_before
    finally:
        stack.close()
    order = sorted(records, key=lambda r: float(r["finished_at"]))
    return {
        "mode": mode,
        "load": load,
        "seconds": ended - began,
        "images_per_s": 64 / (ended - began),
        "failed": sum(r["state"] != "finished" for r in records),
        "sampler_calls": calls,
        "sampling_s": sampling_s,
        "completion_order": "".join(r["tenant"][-1] for r in order),
        "interleaved": interleaved(records),
    }


def interleaved(records: list[dict[str, str]]) -> bool:
    """No tenant's last job finishes before every other tenant's first job starts (the issue's criterion)."""
    tenants = {r["tenant"] for r in records}
    first_start = {t: min(float(r["started_at"]) for r in records if r["tenant"] == t) for t in tenants}
    last_finish = {t: max(float(r["finished_at"]) for r in records if r["tenant"] == t) for t in tenants}
    return not any(all(last_finish[t] < first_start[u] for u in tenants - {t}) for t in tenants)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image (unguided)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one mode may take")
    args = parser.parse_args(argv)
    print(f"# bench/batching.py: {machine()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"tiny model (FGS_MODEL=tiny), 1 worker, OMP_NUM_THREADS=1, {args.steps} DDIM steps, no feedback")
    results = {mode: measure(mode, args.steps, args.timeout) for mode in ("without", "with", "ceiling")}
    print(f"load average after the run: {os.getloadavg()[0]:.1f}")
    print()
    print("| mode | load at start | s for 64 images | images/s | sampler calls | s in sampler calls | s outside them |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        outside = r["seconds"] - r["sampling_s"]
        print(
            f"| {r['mode']} | {r['load']:.1f} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {r['sampler_calls']} | "
            f"{r['sampling_s']:.1f} | {outside:.1f} |"
        )
    with_, without, ceiling = (results[m]["images_per_s"] for m in ("with", "without", "ceiling"))
    print()
    print(f"with / ceiling = {with_ / ceiling:.2f} (target >= 0.8)")
    print(f"with / without = {with_ / without:.2f} (target >= 1.5)")
    for mode in ("without", "with"):
        r = results[mode]
        print(f"completion order by tenant ({mode}): {r['completion_order']}; interleaved: {r['interleaved']}")
    failed = sum(r["failed"] for r in results.values())
    met = with_ / ceiling >= 0.8 and with_ / without >= 1.5 and results["with"]["interleaved"] and not failed
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
