"""The web page's gallery at 10,000 images: time to first paint and to the next page, measured in the browser.

A batch of 40 finished jobs x 250 images is written through the real job records (JobQueue.enqueue, then the
workers' own state transitions with their results), with 10,000 distinct 32x32 PNGs in the artifact store, as
a worker would leave them; no model runs. Then the real API (uvicorn, loopback) serves the page to Debian's
Chromium (Playwright, headless). Each time runs from the click to the moment every thumbnail of the page is
decoded and a frame has been drawn; thumbnails are cold (made on first request), as for a fresh batch.

    .venv/bin/python bench/ui.py            # prints the table; --write appends it to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from fgs_common.artifact_store import ArtifactStore
from fgs_common.loopback import free_port
from fgs_common.settings import Settings
from fgs_common.wire import ImageResult
from fgs_lab.live_stack import spawn_api, wait_until_serving
from fgs_service.auth import Tenant, hash_key
from fgs_service.redis_server import start_redis_server, stop_redis_server

sys.path.insert(0, str(Path(__file__).parent))
from finished_jobs import digit_requests, write_finished_jobs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOBS, IMAGES_PER_JOB, CLASSES = 40, 250, 10
KEY = "bench-ui-key-" + "u" * 24
PAGES = 3  # pages after the first, each timed


def png_with_metadata(pixels: np.ndarray, parameters: dict) -> bytes:
    from io import BytesIO

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("fgs", json.dumps(parameters, sort_keys=True))
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_batch(settings: Settings) -> str:
    """40 finished jobs of 250 images each (distinct PNGs in the artifact store), as one batch."""
    store = ArtifactStore(settings.data_dir)
    rng = np.random.default_rng(0)

    def results_of(number: int, request) -> list[ImageResult]:
        results = []
        for seed in request.seeds():
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            value = float(rng.uniform(0, 2.3))
            predicted = int(rng.integers(0, CLASSES))
            png = png_with_metadata(pixels, {"seed": seed, "criterion_value": value})
            image_id = store.put_image("bench", png, "png")
            results.append(ImageResult(image_id=image_id, seed=seed, criterion_value=value, predicted_class=predicted))
        return results

    requests = digit_requests(JOBS, IMAGES_PER_JOB, CLASSES)
    return write_finished_jobs(settings, Tenant("bench", 10**9), requests, results_of, batch_id="b" * 32)


MEASURE = """async ([action, page]) => {
  const grid = document.querySelector('#gallery-grid');
  const label = document.querySelector('#gallery-page-label');
  const t0 = performance.now();
  if (action === 'open') location.hash = arguments[0][2];
  else document.querySelector('#gallery-next').click();
  await new Promise((resolve) => {
    const check = () => (grid.getAttribute('aria-busy') === 'false' && label.textContent.startsWith(`page ${page} `))
      ? resolve() : requestAnimationFrame(check);
    check();
  });
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));  // drawn
  return {ms: performance.now() - t0, tiles: grid.querySelectorAll('img.thumb[src^="blob:"]').length};
}"""


def measure(base_url: str, batch_id: str) -> list[tuple[str, float, int]]:
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(base_url + "/ui/")
        page.fill("#api-key", KEY)
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#view-jobs:not([hidden])")
        first = page.evaluate(MEASURE.replace("arguments[0][2]", f"'#gallery?batch={batch_id}'"), ["open", 1])
        rows.append(("gallery, first page (cold thumbnails)", first["ms"], first["tiles"]))
        for number in range(2, 2 + PAGES):
            result = page.evaluate(MEASURE, ["next", number])
            rows.append((f"next page ({number}, cold thumbnails)", result["ms"], result["tiles"]))
        page.screenshot(path=str(Path(tempfile.gettempdir()) / "bench_ui_gallery.png"))
        browser.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="fgs-bench-ui-"))
    port = free_port()
    redis_process, redis_url = start_redis_server()
    api = None
    try:
        settings = Settings(redis_url=redis_url, redis_prefix="fgs-bench-ui", data_dir=work / "data")
        began = time.perf_counter()
        batch_id = write_batch(settings)
        print(f"wrote {JOBS * IMAGES_PER_JOB} images in {JOBS} job records in {time.perf_counter() - began:.1f} s")
        keys = {"tenants": [{"name": "bench", "key_sha256": [hash_key(KEY)]}]}
        env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
        env.update(
            FGS_REDIS_URL=redis_url,
            FGS_REDIS_PREFIX="fgs-bench-ui",
            FGS_DATA_DIR=str(work / "data"),
            FGS_API_KEYS=json.dumps(keys),
        )
        api = spawn_api(env, port)
        base_url = f"http://127.0.0.1:{port}"
        wait_until_serving(base_url, [api], timeout_s=20)
        rows = measure(base_url, batch_id)
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=30)
        stop_redis_server(redis_process)
        shutil.rmtree(work, ignore_errors=True)

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### bench/ui.py ({when}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} before the run)",
        f"Command: `.venv/bin/python bench/ui.py`; a batch of {JOBS} jobs x {IMAGES_PER_JOB} = "
        f"{JOBS * IMAGES_PER_JOB:,} images (32x32), 60 thumbnails a page; API and Chromium on the same machine.",
        "",
        "| in the browser | ms | thumbnails shown | target |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {ms:.0f} | {tiles} | <= 1000 ms |" for name, ms, tiles in rows],
    ]
    print("\n".join(lines))
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as results:
            results.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
