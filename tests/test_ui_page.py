"""The web page end to end: a real stack (tiny model, one worker) and Debian's Chromium driven by Playwright.

Every browser context is cut off from anything but loopback (a request elsewhere is aborted and recorded), and
every request the page makes is checked for the API key in its URL. Screenshots of the gallery and the
operator view go to the directory printed at the start (FGS_UI_SCREENSHOTS_TO_BENCH=1 also copies them to
bench/ui_gallery.png and bench/ui_operator.png).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from fgs_common.wire import GenerationParams
from fgs_service.auth import hash_key
from support.live_calls import generate, png_bytes, upload_classifier, wait_final, wait_for
from support.stack import start_stack

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
ADMIN_KEY = "key-ops-" + "o" * 24
REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost"}
TIMEOUT_MS = 60_000
GRID_SHOWS_IDS = (
    "ids => JSON.stringify([...document.querySelectorAll('#gallery-grid figure.tile')].map(t => t.dataset.imageId))"
    " === JSON.stringify(ids)"
)


@pytest.fixture(scope="module")
def ui_stack(redis_server, tiny_model_dir, tmp_path_factory):
    """The stack with one worker and an admin tenant 'ops' besides alpha, beta and capped."""
    admin = {"tenants": [{"name": "ops", "key_sha256": [hash_key(ADMIN_KEY)], "admin": True}]}
    stack = start_stack(
        redis_server,
        tiny_model_dir,
        tmp_path_factory.mktemp("ui"),
        workers=1,
        extra_env={"FGS_API_KEYS": json.dumps(admin)},
    )
    stack.keys["ops"] = ADMIN_KEY
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ui-screenshots")
    print(f"\nUI screenshots: {directory}")
    return directory


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


class Session:
    """A browser context on the page: loopback only, every request URL recorded."""

    def __init__(self, browser, stack, tenant: str | None):
        self.stack = stack
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.blocked: list[str] = []
        self.urls: list[str] = []
        self.context.route("**/*", self._loopback_only)
        self.context.on("request", lambda request: self.urls.append(request.url))
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.goto(stack.base_url + "/")
        if tenant:
            self.sign_in(stack.keys[tenant])

    def _loopback_only(self, route):
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def sign_in(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#signin-form button[type=submit]")
        self.page.wait_for_selector("#view-jobs:not([hidden])")

    def close(self) -> None:
        for key in self.stack.keys.values():
            assert not [url for url in self.urls if key in url], "the API key appeared in a URL"
        assert self.blocked == [], f"the page asked for non-loopback URLs: {self.blocked}"
        self.context.close()


@pytest.fixture
def session_of(browser, ui_stack):
    sessions = []

    def open_session(tenant: str | None) -> Session:
        sessions.append(Session(browser, ui_stack, tenant))
        return sessions[-1]

    yield open_session
    for session in sessions:
        session.close()


@pytest.fixture(scope="module")
def classifier_id(ui_stack, classifier_files) -> str:
    archive, spec = classifier_files
    with ui_stack.client("alpha") as alpha:
        response = upload_classifier(alpha, archive.read_bytes(), spec)
    assert response.status_code == 201, response.text
    return response.json()["classifier_id"]


@pytest.fixture(scope="module")
def finished_job(ui_stack):
    """A finished job of alpha with two images, for the tests that read one (they run alone or in any order)."""
    with ui_stack.client("alpha") as alpha:
        job = wait_final(alpha, generate(alpha, num_images=2, steps=2, guidance_every=1, seed=21))
    assert job.state.value == "finished", job
    return job


def page_bytes(page, blob_url: str) -> bytes:
    """The bytes behind a blob: URL the page shows."""
    numbers = page.evaluate("async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", blob_url)
    return bytes(numbers)


def test_progress_reaches_100_and_gallery_shows_the_jobs_images(session_of, ui_stack, classifier_id, artifacts):
    session = session_of("alpha")
    page = session.page
    with ui_stack.client("alpha") as alpha:
        job_id = generate(
            alpha,
            prompt="a photo of digit three",
            class_index=3,
            num_images=6,
            steps=6,
            guidance_every=2,
            criterion="entropy",
            omega=0.05,
            classifier_id=classifier_id,
            seed=11,
        )
        row = page.locator(f"tr.job[data-job-id='{job_id}']")
        row.wait_for()
        # the page's own progress text reaches 100 % (fed by the job's event stream and the poll)
        page.wait_for_function(
            "id => { const r = document.querySelector(`tr.job[data-job-id='${id}']`);"
            " return r && r.querySelector('.percent').textContent === '100 %' && r.dataset.state === 'finished'; }",
            arg=job_id,
        )
        job = wait_final(alpha, job_id)
        assert job.state.value == "finished"
        assert job.progress.images_done == 6
        assert row.locator("td").nth(5).inner_text() != "–", "images/s is shown for a finished job"
        # the row's request, read from the nested record
        assert row.locator("td").nth(1).inner_text() == "a photo of digit three"  # its spec names no classes
        assert row.locator("td").nth(2).inner_text() == "entropy ω=0.05"

        row.locator("a", has_text="gallery").click()
        page.wait_for_selector("#gallery-grid[aria-busy=false]")
        shown = page.eval_on_selector_all("#gallery-grid figure.tile", "tiles => tiles.map(t => t.dataset.imageId)")
        assert shown == [r.image_id for r in job.results]
        # thumbnails, not the full images, fill the grid; all of them decoded
        assert page.eval_on_selector_all(
            "#gallery-grid img.thumb", "imgs => imgs.every(i => i.src.startsWith('blob:') && i.naturalWidth > 0)"
        )
        assert not [u for u in session.urls if re.search(r"/v1/images/[0-9a-f]{64}$", u)], "full images in the grid"

        # the side panel shows the full image: the same bytes as GET /v1/images/{image_id}, and its metadata
        first = job.results[0]
        page.click(f"#gallery-grid figure.tile[data-image-id='{first.image_id}']")
        page.wait_for_function(
            "id => { const i = document.querySelector('#detail-image');"
            " return i.dataset.imageId === id && i.src.startsWith('blob:') && i.complete; }",
            arg=first.image_id,
        )
        full = alpha.get(f"/v1/images/{first.image_id}")
        assert full.status_code == 200
        assert page_bytes(page, page.get_attribute("#detail-image", "src")) == full.content
        meta = dict(
            zip(
                page.locator("#detail-meta th").all_inner_texts(),
                page.locator("#detail-meta td").all_inner_texts(),
                strict=False,
            )
        )
        assert meta["seed"] == str(first.seed) and meta["criterion"] == "entropy" and meta["ω"] == "0.05"
        assert meta["γ"] == f"{GenerationParams().gamma:g}" and meta["p"] == "0"  # the defaults the job got
        expected = "a photo of digit three" if first.predicted_class == 3 else f"class {first.predicted_class}"
        assert meta["predicted class"] == expected
        assert float(meta["criterion value"]) == pytest.approx(first.criterion_value, rel=1e-3)
        page.screenshot(path=str(artifacts / "ui_gallery.png"), full_page=True)

        # sort by criterion value and filter on "classifier disagrees"
        page.select_option("#gallery-sort", "criterion_desc")
        page.wait_for_function("() => document.querySelector('#gallery-grid').getAttribute('aria-busy') === 'false'")
        by_value = sorted(job.results, key=lambda r: -r.criterion_value)
        page.wait_for_function(
            GRID_SHOWS_IDS,
            arg=[r.image_id for r in by_value],
        )
        page.check("#gallery-disagrees")
        disagreeing = [r.image_id for r in by_value if r.predicted_class != 3]
        page.wait_for_function(
            GRID_SHOWS_IDS,
            arg=disagreeing,
        )


TEAM_NAMES = ["apple", "banana", "cherry", "lemon", "lime", "mango", "olive", "peach", "plum", "quince"]
SEED = 975561995220926170  # past 2^53: a JavaScript number shows it as 975561995220926200


def test_the_page_names_classes_as_the_team_does_and_shows_64_bit_seeds_exactly(
    session_of, ui_stack, classifier_files, artifacts
):
    archive, spec = classifier_files
    with ui_stack.client("alpha") as alpha:
        uploaded = upload_classifier(alpha, archive.read_bytes(), spec.model_copy(update={"class_names": TEAM_NAMES}))
        assert uploaded.status_code == 201, uploaded.text
        job_id = generate(
            alpha, prompt="a handwritten digit three", class_index=3, num_images=2, steps=2, guidance_every=1,
            criterion="entropy", omega=0.05, classifier_id=uploaded.json()["classifier_id"], seed=SEED, group="grass",
        )  # fmt: skip
        job = wait_final(alpha, job_id)
        assert job.state.value == "finished"
        view = alpha.get("/v1/views/gallery", params={"job_id": job_id}).json()
        assert [item["seed"] for item in view["items"]] == [str(SEED), str(SEED + 1)]  # strings end to end
    session = session_of("alpha")
    page = session.page
    row = page.locator(f"tr.job[data-job-id='{job_id}']")
    page.wait_for_function(
        "id => (document.querySelector(`tr.job[data-job-id='${id}'] td:nth-child(2)`) || {}).textContent"
        " === 'lemon · a handwritten digit three'",
        arg=job_id,
    )
    # the state filter: a finished job is shown under "finished", not under "queued or running"
    page.select_option("#jobs-state", "active")
    assert row.count() == 0
    page.select_option("#jobs-state", "finished")
    row.wait_for()
    assert "img/s is generation speed" in page.inner_text("#jobs-legend")

    page.goto(f"{ui_stack.base_url}/ui/#gallery?job={job_id}")
    page.wait_for_selector("#gallery-grid[aria-busy=false]")
    captions = page.locator("#gallery-grid figcaption").all_inner_texts()
    names = [TEAM_NAMES[result.predicted_class] for result in job.results]
    assert [caption.split("\n")[0] for caption in captions] == [f"seed {SEED}", f"seed {SEED + 1}"]
    assert [f"ŷ={name}" in caption for caption, name in zip(captions, names, strict=True)] == [True, True]
    assert page.locator("#gallery-class option", has_text="lemon (2)").count() == 1
    # the group menu (class x group runs): shown, since this job fills the group "grass"
    assert page.is_visible("#gallery-group") and page.locator("#gallery-group option", has_text="grass").count() == 1
    page.select_option("#gallery-group", "grass")
    page.wait_for_function(GRID_SHOWS_IDS, arg=[result.image_id for result in job.results])
    page.click(f"#gallery-grid figure.tile[data-image-id='{job.results[0].image_id}']")
    page.wait_for_selector("#gallery-detail:not([hidden])")
    meta = dict(
        zip(
            page.locator("#detail-meta th").all_inner_texts(),
            page.locator("#detail-meta td").all_inner_texts(),
            strict=False,
        )
    )
    assert meta["seed"] == str(SEED) and meta["class"] == "lemon (class 3)" and meta["predicted class"] == names[0]
    assert meta["group"] == "grass"
    page.screenshot(path=str(artifacts / "ui_team_names.png"), full_page=True)

    page.goto(f"{ui_stack.base_url}/ui/#compare?class=3")
    page.wait_for_selector("#compare-grid thead th")
    assert page.locator("#compare-class option", has_text="lemon").count() == 1
    assert page.inner_text("#compare-grid thead th >> nth=0") == "lemon"
    assert f"seed {SEED}" in page.inner_text("#compare-grid thead")


def test_cancel_a_running_job_from_the_page(session_of, ui_stack):
    session = session_of("alpha")
    page = session.page
    with ui_stack.client("alpha") as alpha:
        job_id = generate(alpha, num_images=8, steps=400, guidance_every=5, seed=5)
        wait_for(alpha, job_id, lambda j: j.state.value == "running" and j.progress.step >= 1)
        row = page.locator(f"tr.job[data-job-id='{job_id}']")
        page.wait_for_selector(f"tr.job[data-job-id='{job_id}'][data-state=running]")
        row.locator("button.cancel").click()
        page.wait_for_selector(f"tr.job[data-job-id='{job_id}'][data-state=canceled]")
        job = wait_final(alpha, job_id, timeout=60)
        assert job.state.value == "canceled"
        assert job.progress.images_done < 8


def test_another_tenant_sees_none_of_the_first_tenants_work(session_of, ui_stack, finished_job):
    job = finished_job
    session = session_of("beta")
    page = session.page
    page.wait_for_selector("#jobs-count:not(:empty)")
    assert page.locator(f"[data-job-id='{job.job_id}']").count() == 0
    assert page.inner_text("#jobs-count") == "0 jobs"
    # the gallery of alpha's job, asked for by beta: not found, no images
    page.goto(f"{ui_stack.base_url}/ui/#gallery?job={job.job_id}")
    page.wait_for_selector("#gallery-error:not(:empty)")
    assert "no job" in page.inner_text("#gallery-error")
    assert page.locator("#gallery-grid figure").count() == 0
    # beta's recent-jobs gallery is empty too
    page.goto(f"{ui_stack.base_url}/ui/#gallery")
    page.wait_for_function("() => document.querySelector('#gallery-page-label').textContent.includes('0 images')")
    # alpha's thumbnail and image URLs, fetched the page's way with beta's key: 404
    image_id = job.results[0].image_id
    statuses = page.evaluate(
        """async ([id, key]) => Promise.all([`/v1/images/${id}/thumbnail`, `/v1/images/${id}`]
             .map(async (u) => (await fetch(u, {headers: {Authorization: `Bearer ${key}`}})).status))""",
        [image_id, ui_stack.keys["beta"]],
    )
    assert statuses == [404, 404]
    # beta is no admin: no operator view
    assert page.locator("#nav-operator").is_hidden()


def test_thumbnail_endpoint_is_small_cached_and_tenant_checked(ui_stack, finished_job):
    job = finished_job
    image_id = job.results[0].image_id
    with ui_stack.client("alpha") as alpha, ui_stack.client("beta") as beta:
        response = alpha.get(f"/v1/images/{image_id}/thumbnail", params={"size": 64})
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/webp"
        assert "immutable" in response.headers["cache-control"]
        with Image.open(io.BytesIO(response.content)) as thumbnail:
            assert max(thumbnail.size) <= 64
        again = alpha.get(
            f"/v1/images/{image_id}/thumbnail", params={"size": 64}, headers={"If-None-Match": response.headers["etag"]}
        )
        assert again.status_code == 304
        assert beta.get(f"/v1/images/{image_id}/thumbnail").status_code == 404
        assert httpx.get(f"{ui_stack.base_url}/v1/images/{image_id}/thumbnail").status_code == 401
        too_big = alpha.get(f"/v1/images/{image_id}/thumbnail", params={"size": 4096})
        assert too_big.status_code == 422 and "size" in too_big.json()["error"]["message"]
        assert beta.get("/v1/views/gallery", params={"job_id": job.job_id}).status_code == 404
        assert alpha.get("/v1/views/gallery", params={"job_id": job.job_id, "batch_id": "x"}).status_code == 422


def test_operator_view_for_admin_keys_only(session_of, ui_stack, artifacts):
    with ui_stack.client("alpha") as alpha, ui_stack.client("ops") as ops:
        assert alpha.get("/v1/admin/overview").status_code == 403
        # a job that fails on every attempt: its stored conditioning image is damaged behind the API's back
        image_id = alpha.post("/v1/images", files={"file": ("c.png", png_bytes(5), "image/png")}).json()["image_id"]
        (ui_stack.data_dir / "tenants" / "alpha" / "images" / f"{image_id}.png").write_bytes(b"damaged")
        failing = generate(alpha, num_images=1, steps=2, guidance_every=1, conditioning_image_ids=[image_id])
        assert wait_final(alpha, failing).state.value == "failed"
        # and one that finishes, so the last minute's throughput is this test's own, whatever ran before
        assert (
            wait_final(alpha, generate(alpha, num_images=1, steps=2, guidance_every=1, seed=3)).state.value
            == "finished"
        )
        queued = generate(alpha, num_images=8, steps=400, guidance_every=5, seed=7)
        wait_for(alpha, queued, lambda j: j.state.value == "running")
        waiting = generate(alpha, num_images=3, steps=2, guidance_every=1, seed=8)
        session = session_of("ops")
        page = session.page
        page.wait_for_selector("#nav-operator:not([hidden])")
        page.click("#nav-operator")
        page.wait_for_selector("#op-tenants tr[data-tenant=alpha]")
        page.wait_for_selector(f"#op-failed tr[data-job-id='{failing}']")
        page.wait_for_selector(f"#op-workers tr[data-worker] >> text={queued[:8]}")
        cells = page.locator("#op-tenants tr[data-tenant=alpha] td").all_inner_texts()
        assert int(cells[1]) >= 1 and int(cells[2]) >= 8 + 3 and cells[3] == "1"
        assert "UnidentifiedImageError" in page.inner_text(f"#op-failed tr[data-job-id='{failing}']")
        assert "s ago" in page.inner_text("#op-workers tr[data-worker] td:nth-child(2)")
        page.wait_for_function("() => document.querySelectorAll('#op-throughput .bar-col').length === 10")
        page.screenshot(path=str(artifacts / "ui_operator.png"), full_page=True)
        overview = ops.get("/v1/admin/overview").json()
        assert overview["images_per_s_last_minute"] > 0  # at least the finished job above
        for job_id in (queued, waiting):
            alpha.delete(f"/v1/jobs/{job_id}")
            wait_final(alpha, job_id, timeout=60)
    if os.environ.get("FGS_UI_SCREENSHOTS_TO_BENCH") == "1":
        for name in ("ui_gallery.png", "ui_operator.png"):
            if (artifacts / name).exists():
                shutil.copy(artifacts / name, REPO / "bench" / name)


def test_docs_and_redoc_render_with_the_network_cut_off(session_of, ui_stack):
    session = session_of(None)
    page = session.page
    page.goto(ui_stack.base_url + "/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/generate']")
    assert page.locator(".opblock").count() >= 15
    page.wait_for_selector("button.authorize")  # the Bearer scheme is declared: Swagger offers Authorize
    page.goto(ui_stack.base_url + "/redoc")
    page.get_by_text("/v1/generate").first.wait_for()
    schema = httpx.get(f"{ui_stack.base_url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the tenant's API key",
    }
    assert {"ApiKey": []} in schema["paths"]["/v1/generate"]["post"]["security"]


def test_root_leads_to_the_page_and_a_wrong_key_is_refused(session_of, ui_stack):
    session = session_of(None)
    page = session.page
    assert urlsplit(page.url).path == "/ui/"
    page.fill("#api-key", "not-a-key")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:not(:empty)")
    assert page.inner_text("#signin-error") == "Unknown API key."
    assert page.evaluate("() => sessionStorage.length") == 0
    assert page.locator("#view-jobs").is_hidden()
