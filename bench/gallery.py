"""Gallery and compare at 10,000 images: a request with the parsed final jobs cached (GalleryCache) against the same
request parsing every job's record again (a cache of 0 images: what every request did before issue 19), in one
process, on one Redis.

500 finished jobs x 20 images (the gallery's scope without a job or batch: the tenant's 500 most recent jobs) are
written through the real job records; the app runs in process (FastAPI's TestClient, no sockets: what is timed
is the app's work). Each figure is the median of --repeat requests.

    .venv/bin/python bench/gallery.py            # prints the table; --write appends it to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
import redis.asyncio
from fastapi.testclient import TestClient

from fgs_common.job_records import now_ts
from fgs_common.settings import Settings
from fgs_common.wire import GenerateRequest, ImageResult, JobState
from fgs_service.app import create_app
from fgs_service.auth import Tenant, hash_key
from fgs_service.gallery import GalleryCache
from fgs_service.job_queue import JobQueue
from fgs_service.redis_server import start_redis_server, stop_redis_server

REPO = Path(__file__).resolve().parents[1]
JOBS, IMAGES_PER_JOB, CLASSES = 500, 20, 10
KEY = "bench-gallery-key-" + "g" * 24


def write_jobs(settings: Settings) -> None:
    """JOBS finished jobs of IMAGES_PER_JOB images each, through JobQueue and the job records (no PNGs: the
    gallery's JSON is what is timed, not thumbnails)."""
    sync = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    raw = redis.Redis.from_url(settings.redis_url)
    tenant = Tenant("bench", 10**9)
    requests = [
        GenerateRequest(
            prompt=f"a photo of digit {j % CLASSES}",
            class_index=j % CLASSES,
            num_images=IMAGES_PER_JOB,
            seed=1000 * j,
            criterion="entropy",
            omega=[0.0, 0.03, 0.1, 0.3][(j // CLASSES) % 4],
            classifier_id="0" * 64,
        )
        for j in range(JOBS)
    ]

    async def enqueue() -> list[str]:
        async_redis = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        queue = JobQueue(sync, raw, async_redis, settings)
        enqueued = await queue.enqueue(tenant, requests)
        await async_redis.aclose()
        return enqueued.ids

    job_ids = asyncio.run(enqueue())
    queue = JobQueue(sync, raw, None, settings)
    for number, (job_id, request) in enumerate(zip(job_ids, requests, strict=True)):
        results = [
            ImageResult(
                image_id=f"{number:032x}{seed:032x}",
                seed=seed,
                criterion_value=(seed % 97) / 40,
                predicted_class=seed % CLASSES,
            )
            for seed in request.seeds()
        ]
        records = queue.records
        assert records.transition(job_id, JobState.running, (JobState.queued,), started_at=now_ts(), owner="bench")
        assert records.set_progress(job_id, "bench", results_from=0, results=results)
        assert records.transition(job_id, JobState.finished, (JobState.running,), finished_at=now_ts())
    raw.delete(queue.queue("bench").key)


def median_ms(client: TestClient, path: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        response = client.get(path, headers={"Authorization": f"Bearer {KEY}"})
        times.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    server, url = start_redis_server()
    paths = {
        "gallery, sorted by criterion, first page": "/v1/views/gallery?sort=criterion_desc&limit=60",
        "gallery, one class, disagreeing": "/v1/views/gallery?class_index=3&disagrees=true&limit=60",
        "compare, one class by setting": "/v1/views/compare?class_index=3",
    }
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            keys = json.dumps({"tenants": [{"name": "bench", "key_sha256": [hash_key(KEY)]}]})
            settings = Settings(redis_url=url, data_dir=Path(tmp), api_keys=keys, classifier_check=False)
            write_jobs(settings)
            ttl = settings.job_record_ttl_s
            with TestClient(create_app(settings)) as client:
                for label, path in paths.items():
                    client.app.state.gallery_cache = GalleryCache(0, ttl)  # nothing kept: every job parsed again
                    uncached = median_ms(client, path, args.repeat)
                    client.app.state.gallery_cache = GalleryCache(settings.gallery_cache_images, ttl)
                    median_ms(client, path, 1)  # fills the cache
                    cached = median_ms(client, path, args.repeat)
                    rows.append((label, uncached, cached))
    finally:
        stop_redis_server(server)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### bench/gallery.py ({when}, {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
        "before the run)",
        f"Command: `.venv/bin/python bench/gallery.py`; {JOBS} finished jobs x {IMAGES_PER_JOB} = "
        f"{JOBS * IMAGES_PER_JOB:,} images, in process (TestClient), median of {args.repeat} requests.",
        "",
        "| request | every job parsed (ms) | final jobs cached (ms) | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {before:.0f} | {after:.1f} | {before / after:.1f}x |" for label, before, after in rows),
    ]
    print("\n".join(lines))
    if args.write:
        results = REPO / "bench" / "RESULTS.md"
        heading = "## bench/gallery.py: gallery and compare at 10,000 images (issue 19)"
        text = results.read_text()
        if heading not in text:
            text += f"\n{heading}\n"
        results.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
