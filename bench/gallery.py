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
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient

from fgs_common.settings import Settings
from fgs_common.wire import ImageResult
from fgs_service.app import create_app
from fgs_service.auth import Tenant, hash_key
from fgs_service.gallery import GalleryCache
from fgs_service.redis_server import start_redis_server, stop_redis_server

sys.path.insert(0, str(Path(__file__).parent))
from finished_jobs import digit_requests, write_finished_jobs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOBS, IMAGES_PER_JOB, CLASSES = 500, 20, 10
KEY = "bench-gallery-key-" + "g" * 24


def write_jobs(settings: Settings) -> None:
    """JOBS finished jobs of IMAGES_PER_JOB images each (no PNGs: the gallery's JSON is what is timed, not
    thumbnails)."""

    def results_of(number: int, request) -> list[ImageResult]:
        return [
            ImageResult(
                image_id=f"{number:032x}{seed:032x}",
                seed=seed,
                criterion_value=(seed % 97) / 40,
                predicted_class=seed % CLASSES,
            )
            for seed in request.seeds()
        ]

    write_finished_jobs(settings, Tenant("bench", 10**9), digit_requests(JOBS, IMAGES_PER_JOB, CLASSES), results_of)


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
