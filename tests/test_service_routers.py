"""The routers in process: `TestClient(create_app(settings))` against the session's redis-server, no workers.

What a worker does is the end-to-end tests' part; here every status code and body a client sees from the API
alone, exactly, in well under a second per test.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from fgs_common.artifact_store import ArtifactStore
from fgs_common.hardness_stats_format import encode_header, layout, metadata
from fgs_common.job_records import JobRecords
from fgs_common.loopback import free_port
from fgs_common.wire import ClassifierOutput, ClassifierSpec, GenerationParams, ImageResult, JobState
from fgs_service.app import create_app
from support.live_calls import png_bytes
from support.service_settings import service_settings
from support.stack import CAPPED_MAX_IMAGES, TENANT_KEYS

WORKER_TOKEN = "test-worker:token"


def run_as_a_worker(records: JobRecords, job_id: str, results: list[dict], claimed: bool = False) -> None:
    """What a worker writes for a queued job: its claim (unless `claimed`), its results, its end (`finished`)."""
    if not claimed:
        assert records.transition(job_id, JobState.running, (JobState.queued,), started_at=1.0, owner=WORKER_TOKEN)
    written = [ImageResult.model_validate(result) for result in results]
    assert records.set_progress(job_id, WORKER_TOKEN, results_from=0, results=written)
    assert records.transition(job_id, JobState.finished, (JobState.running,), images_done=len(results), finished_at=2.0)


JOB = {"prompt": "a digit", "class_index": 1, "num_images": 2, "steps": 2, "guidance_every": 1}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}


def torchscript_shaped_zip() -> bytes:
    """A zip with TorchScript's member layout: what the API recognises without torch (the check is off here)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("clf/constants.pkl", b"")
        archive.writestr("clf/code/__torch__.py", b"")
    return buffer.getvalue()


@pytest.fixture
def settings(redis_server, tmp_path):
    return service_settings(redis_server, tmp_path / "data")


@pytest.fixture
def api(settings):
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def records(redis_server, settings):
    """A view of the app's Redis under its prefix, for what a worker would have written."""
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    yield JobRecords(client, settings.redis_prefix)
    client.close()


def upload_classifier(api, tenant: str = "alpha", num_classes: int = 10, stats: bytes | None = None) -> str:
    files = {"archive": ("clf.pt", torchscript_shaped_zip(), "application/octet-stream")}
    if stats is not None:
        files["hardness_stats"] = ("stats.safetensors", stats, "application/octet-stream")
    output = ClassifierOutput.logits if stats is None else ClassifierOutput.logits_embedding
    spec = ClassifierSpec(num_classes=num_classes, input_size=32, output=output).model_dump_json()
    response = api.post("/v1/classifiers", files=files, data={"spec": spec}, headers=auth(tenant))
    assert response.status_code == 201, response.text
    return response.json()["classifier_id"]


def safetensors_bytes(num_classes: int = 10, dim: int = 4) -> bytes:
    """Hardness statistics of the v2 layout (zeros: the API reads only the header; a worker would score)."""
    entries = layout(num_classes, dim, [1] * num_classes)
    return encode_header(entries, metadata(num_classes, dim)) + bytes(sum(e.nbytes for e in entries))


def test_probes_and_the_worker_count(api, records):
    unknown = {"store_writable": None, "store_error": None}
    writable = {"store_writable": True, "store_error": None}
    assert api.get("/healthz").json() == {"status": "ok", "redis": None, "workers": None} | unknown
    assert api.get("/readyz").json() == {"status": "ready, no live workers", "redis": True, "workers": 0} | writable
    records.redis.set(records.keys.worker_alive("w1"), "1", ex=30)
    response = api.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "redis": True, "workers": 1} | writable


def test_readyz_is_503_when_redis_does_not_answer(tmp_path):
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(service_settings(nobody, tmp_path / "data"))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "status": "redis unreachable",
            "redis": False,
            "workers": None,
            "store_writable": True,
            "store_error": None,
        }
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({}, "no API key was sent."),
        ({"Authorization": "Bearer nope"}, "the API key is not one this service knows."),
        ({"Authorization": f"Basic {TENANT_KEYS['alpha']}"}, "no API key was sent."),
    ],
)
def test_requests_without_a_known_key_are_401_saying_where_a_key_comes_from(api, headers, reason):
    response = api.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["message"].startswith(reason)
    for hint in ("fgs hash-key", "FGS_DEV_API_KEY", "Authorization: Bearer <key>", "--api-key", "FGS_API_KEY"):
        assert hint in error["message"]


def test_image_upload_download_and_tenancy(api):
    data = png_bytes(seed=3, size=16)
    response = api.post("/v1/images", files={"file": ("a.png", data, "image/png")}, headers=auth("alpha"))
    assert response.status_code == 201
    uploaded = response.json()
    assert uploaded.pop("created_at")
    assert uploaded == {"image_id": hashlib.sha256(data).hexdigest(), "width": 16, "height": 16, "name": "a.png"}
    image_id = response.json()["image_id"]
    download = api.get(f"/v1/images/{image_id}", headers=auth("alpha"))
    assert download.status_code == 200 and download.content == data
    assert download.headers["content-type"] == "image/png"
    assert api.get(f"/v1/images/{image_id}", headers=auth("beta")).status_code == 404
    not_image = api.post("/v1/images", files={"file": ("a.png", b"hello", "image/png")}, headers=auth("alpha"))
    assert not_image.status_code == 415 and not_image.json()["error"]["code"] == "not_an_image"
    empty = api.post("/v1/images", files={"file": ("a.png", b"", "image/png")}, headers=auth("alpha"))
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_upload"


def test_uploaded_images_have_a_name_and_date_and_their_tenant_deletes_them(api, settings):
    first, second = png_bytes(seed=5, size=16), png_bytes(seed=6, size=16)
    ids = [
        api.post("/v1/images", files={"file": (name, data, "image/png")}, headers=auth("alpha")).json()["image_id"]
        for name, data in (("one.png", first), ("two.png", second))
    ]
    again = api.post("/v1/images", files={"file": ("renamed.png", first, "image/png")}, headers=auth("alpha")).json()
    assert again["name"] == "one.png"  # the same bytes keep their first name and date
    listed = api.get("/v1/images", headers=auth("alpha")).json()
    expected = [(ids[0], "one.png", 16), (ids[1], "two.png", 16)]
    assert [(i["image_id"], i["name"], i["width"]) for i in listed] == expected
    assert all(i["created_at"] for i in listed)
    assert api.get("/v1/images", headers=auth("beta")).json() == []
    assert api.delete(f"/v1/images/{ids[0]}", headers=auth("beta")).status_code == 404
    for size in (32, 160):
        assert (
            api.get(f"/v1/images/{ids[0]}/thumbnail", params={"size": size}, headers=auth("alpha")).status_code == 200
        )
    thumbnails = settings.data_dir / "tenants" / "alpha" / "thumbnails"
    assert len(list(thumbnails.glob(f"*/{ids[0]}.webp"))) == 2
    assert api.delete(f"/v1/images/{ids[0]}", headers=auth("alpha")).status_code == 204
    assert list(thumbnails.glob(f"*/{ids[0]}.webp")) == []  # no thumbnail outlives its image
    assert api.get(f"/v1/images/{ids[0]}", headers=auth("alpha")).status_code == 404
    assert [i["image_id"] for i in api.get("/v1/images", headers=auth("alpha")).json()] == [ids[1]]
    job = {**JOB, "conditioning_image_ids": [ids[0]]}
    assert api.post("/v1/generate", json=job, headers=auth("alpha")).status_code == 404


def test_an_upload_record_deleted_while_the_images_are_listed_is_left_out(api, settings, monkeypatch):
    image_id = api.post(
        "/v1/images", files={"file": ("one.png", png_bytes(seed=5, size=16), "image/png")}, headers=auth("alpha")
    ).json()["image_id"]
    record = settings.data_dir / "tenants" / "alpha" / "uploads" / f"{image_id}.json"
    real_glob = Path.glob

    def glob_then_delete(self, pattern):  # the listing sees the record, a concurrent delete removes it
        found = list(real_glob(self, pattern))
        record.unlink(missing_ok=True)
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob_then_delete)
    listed = api.get("/v1/images", headers=auth("alpha"))
    assert listed.status_code == 200 and listed.json() == []


def test_generate_read_list_and_cancel_a_job(api):
    response = api.post("/v1/generate", json=JOB, headers=auth("alpha"))
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    job = api.get(f"/v1/jobs/{job_id}", headers=auth("alpha")).json()
    assert job["state"] == "queued" and job["progress"]["images_total"] == 2 and job["request"]["prompt"] == "a digit"
    assert api.get(f"/v1/jobs/{job_id}", headers=auth("beta")).status_code == 404
    listed = api.get("/v1/jobs", params={"state": "queued"}, headers=auth("alpha")).json()
    assert listed["count"] == 1 and [j["job_id"] for j in listed["jobs"]] == [job_id]
    assert api.get("/v1/jobs", headers=auth("beta")).json() == {"jobs": [], "count": 0, "total": 0}
    assert api.delete(f"/v1/jobs/{job_id}", headers=auth("beta")).status_code == 404
    canceled = api.delete(f"/v1/jobs/{job_id}", headers=auth("alpha"))
    assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
    again = api.delete(f"/v1/jobs/{job_id}", headers=auth("alpha"))
    assert again.status_code == 409
    assert again.json() == {"error": {"code": "job_finished", "message": f"job {job_id} is already canceled"}}


def test_a_list_page_says_how_many_jobs_there_are_in_all(api):
    job_ids = [api.post("/v1/generate", json=JOB, headers=auth("alpha")).json()["job_id"] for _ in range(3)]
    page = api.get("/v1/jobs", params={"limit": 2}, headers=auth("alpha")).json()
    assert page["count"] == 2 and page["total"] == 3
    assert [j["job_id"] for j in page["jobs"]] == job_ids[::-1][:2]
    rest = api.get("/v1/jobs", params={"limit": 2, "offset": 2}, headers=auth("alpha")).json()
    assert rest["count"] == 1 and rest["total"] == 3


def test_omega_without_a_criterion_is_422_and_a_criterion_at_omega_0_is_accepted(api):
    unguided = api.post("/v1/generate", json={**JOB, "omega": 0.1}, headers=auth("alpha"))
    assert unguided.status_code == 422
    assert "omega 0.1 needs a criterion" in unguided.json()["error"]["message"]
    classifier_id = upload_classifier(api, num_classes=10)
    control = {**JOB, "criterion": "entropy", "omega": 0.0, "classifier_id": classifier_id}
    assert api.post("/v1/generate", json=control, headers=auth("alpha")).status_code == 202
    assert api.get("/v1/jobs", headers=auth("alpha")).json()["total"] == 1


def test_jobs_stored_before_the_omega_rule_are_still_read(api, records):
    """A job queued before 'ω > 0 needs a criterion' existed (criterion none at ω 0.5) is listed, read, shown in
    the gallery and replayed by its Idempotency-Key: the rule is for new requests, not stored ones."""
    headers = {**auth("alpha"), "Idempotency-Key": "old"}
    job_id = api.post("/v1/generate", json=JOB, headers=headers).json()["job_id"]
    old_request = {**JOB, "omega": 0.5}  # criterion none: the format JobRecords.create stores (defaults left out)
    records.redis.set(records.keys.request(job_id), json.dumps(old_request))
    results = [{"image_id": "a" * 64, "seed": 0, "criterion_value": None, "predicted_class": 1}]
    run_as_a_worker(records, job_id, results)

    listed = api.get("/v1/jobs", headers=auth("alpha"))
    assert listed.status_code == 200, listed.text
    assert [job["request"]["omega"] for job in listed.json()["jobs"]] == [0.5]
    read = api.get(f"/v1/jobs/{job_id}", headers=auth("alpha"))
    assert read.status_code == 200, read.text
    assert read.json()["request"]["omega"] == 0.5 and read.json()["request"]["criterion"] == "none"
    gallery = api.get("/v1/views/gallery", params={"job_id": job_id}, headers=auth("alpha"))
    assert gallery.status_code == 200, gallery.text
    assert gallery.json()["items"][0]["generation"]["omega"] == 0.5
    replay = api.post("/v1/generate", json=JOB, headers=headers)
    assert replay.status_code == 202 and replay.json()["job_id"] == job_id


def test_events_of_a_finished_job_are_one_event_then_the_end(api):
    job_id = api.post("/v1/generate", json=JOB, headers=auth("alpha")).json()["job_id"]
    api.delete(f"/v1/jobs/{job_id}", headers=auth("alpha"))
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth("alpha")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == "event: job" and len(lines) == 2
    assert JobState(json.loads(lines[1].removeprefix("data: "))["state"]) is JobState.canceled


def test_events_carry_progress_while_a_job_runs_and_the_whole_record_at_its_end(api, records):
    job_id = api.post("/v1/generate", json=JOB, headers=auth("alpha")).json()["job_id"]
    results = [{"image_id": "a" * 64, "seed": 0}, {"image_id": "b" * 64, "seed": 1}]

    def work() -> None:  # what a worker writes, while the stream is open
        time.sleep(0.5)
        records.transition(job_id, JobState.running, (JobState.queued,), started_at=1.0, owner=WORKER_TOKEN)
        time.sleep(0.5)
        run_as_a_worker(records, job_id, results, claimed=True)

    worker = threading.Thread(target=work)
    worker.start()
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth("alpha")) as response:
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    worker.join()
    events = [
        (lines[i].removeprefix("event: "), json.loads(lines[i + 1].removeprefix("data: ")))
        for i in range(0, len(lines), 2)
    ]
    assert [(name, data["state"]) for name, data in events] == [
        ("progress", "queued"),
        ("progress", "running"),
        ("job", "finished"),
    ]
    assert all(set(data) == {"job_id", "state", "progress", "error"} for name, data in events[:-1])
    final = events[-1][1]
    assert final["request"]["prompt"] == "a digit" and [r["image_id"] for r in final["results"]] == ["a" * 64, "b" * 64]


def test_the_same_idempotency_key_answers_with_the_first_job(api):
    headers = {**auth("alpha"), "Idempotency-Key": "once"}
    first = api.post("/v1/generate", json=JOB, headers=headers)
    second = api.post("/v1/generate", json={**JOB, "seed": 9}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json() == first.json()
    assert api.get("/v1/jobs", headers=auth("alpha")).json()["count"] == 1


def test_a_batch_is_queued_whole_and_summarised(api, records):
    body = {"jobs": [JOB, {**JOB, "num_images": 3}]}
    headers = {**auth("alpha"), "Idempotency-Key": "plan-1"}
    accepted = api.post("/v1/batches", json=body, headers=headers)
    assert accepted.status_code == 202
    batch_id, job_ids = accepted.json()["batch_id"], accepted.json()["job_ids"]
    assert len(job_ids) == 2
    assert api.post("/v1/batches", json=body, headers=headers).json() == accepted.json()
    assert records.transition(job_ids[0], JobState.running, (JobState.queued,), images_done=1)
    summary = api.get(f"/v1/batches/{batch_id}", headers=auth("alpha")).json()
    assert summary == {
        "batch_id": batch_id,
        "job_ids": job_ids,
        "images_done": 1,
        "images_total": 5,
        "counts": {"queued": 1, "running": 1, "finished": 0, "failed": 0, "canceled": 0},
    }
    assert api.get(f"/v1/batches/{batch_id}", headers=auth("beta")).status_code == 404


def test_the_page_views_read_jobs_and_images_as_the_wire_defines_them(api, records):
    body = {**JOB, "criterion": "none", "dropout_p": 0.3, "gamma": 2.5, "seed": 40}
    job_id = api.post("/v1/generate", json=body, headers=auth("alpha")).json()["job_id"]
    results = [
        {"image_id": "a" * 64, "seed": 40, "criterion_value": 0.5, "predicted_class": 1},
        {"image_id": "b" * 64, "seed": 41, "criterion_value": None, "predicted_class": 7},
    ]
    run_as_a_worker(records, job_id, results)
    job = api.get(f"/v1/jobs/{job_id}", headers=auth("alpha")).json()
    # the jobs table: the same record as GET /v1/jobs/{job_id}, without the results
    summaries = api.get("/v1/views/jobs", headers=auth("alpha")).json()
    assert summaries["total"] == 1 and summaries["jobs"] == [{k: v for k, v in job.items() if k != "results"}]
    # the gallery: each result with its job's prompt, class and generation parameters
    page = api.get("/v1/views/gallery", params={"job_id": job_id}, headers=auth("alpha")).json()
    generation = {k: v for k, v in job["request"].items() if k in GenerationParams.model_fields}
    # (seeds as strings: the page's JavaScript would round 64-bit ones; names: the prompt, no classifier spec here)
    assert page["items"] == [
        {
            **result,
            "seed": str(result["seed"]),
            "criterion_not_finite": False,
            "job_id": job_id,
            "class_index": 1,
            "class_name": "a digit",
            "prompt": "a digit",
            "predicted_name": "a digit" if result["predicted_class"] == 1 else None,
            "group": None,
            "generation": generation,
            "disagrees": result["predicted_class"] != 1,
        }
        for result in results
    ]
    assert generation["dropout_p"] == 0.3 and generation["gamma"] == 2.5


def test_the_queued_image_cap_is_429_with_retry_after_and_keeps_nothing(api):
    full = {**JOB, "num_images": CAPPED_MAX_IMAGES}
    assert api.post("/v1/generate", json=full, headers=auth("capped")).status_code == 202
    refused = api.post("/v1/generate", json={**JOB, "num_images": 1}, headers=auth("capped"))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "30"
    assert refused.json()["error"]["code"] == "queue_full"
    refused_batch = api.post("/v1/batches", json={"jobs": [JOB]}, headers=auth("capped"))
    assert refused_batch.status_code == 429
    assert api.get("/v1/jobs", headers=auth("capped")).json()["count"] == 1


def test_references_must_exist_and_fit_the_classifier(api):
    missing_image = api.post("/v1/generate", json={**JOB, "conditioning_image_ids": ["0" * 64]}, headers=auth("alpha"))
    assert missing_image.status_code == 404
    assert missing_image.json()["error"]["message"] == f"no image with id {'0' * 64!r}"
    missing_classifier = api.post(
        "/v1/generate", json={**JOB, "criterion": "entropy", "classifier_id": "f" * 64}, headers=auth("alpha")
    )
    assert missing_classifier.status_code == 404
    assert missing_classifier.json()["error"]["message"] == f"no classifier with id {'f' * 64!r}"
    classifier_id = upload_classifier(api, num_classes=2)
    out_of_range = api.post(
        "/v1/generate",
        json={**JOB, "class_index": 2, "criterion": "entropy", "classifier_id": classifier_id},
        headers=auth("alpha"),
    )
    assert out_of_range.status_code == 422
    assert out_of_range.json()["error"]["message"] == ("class_index 2 is out of range: the classifier has 2 classes")
    no_stats = api.post(
        "/v1/generate", json={**JOB, "criterion": "hardness", "classifier_id": classifier_id}, headers=auth("alpha")
    )
    assert no_stats.status_code == 422
    assert "needs a classifier uploaded with hardness statistics" in no_stats.json()["error"]["message"]
    # another tenant's classifier is not there for beta
    other = api.post(
        "/v1/generate", json={**JOB, "criterion": "entropy", "classifier_id": classifier_id}, headers=auth("beta")
    )
    assert other.status_code == 404
    assert api.get("/v1/jobs", headers=auth("alpha")).json()["count"] == 0


def test_classifier_upload_read_and_list(api):
    plain = upload_classifier(api, num_classes=10)
    with_stats = upload_classifier(api, num_classes=10, stats=safetensors_bytes())
    record = api.get(f"/v1/classifiers/{with_stats}", headers=auth("alpha")).json()
    assert record["has_hardness_stats"] is True and record["spec"]["num_classes"] == 10
    listed = api.get("/v1/classifiers", headers=auth("alpha")).json()
    assert sorted(c["classifier_id"] for c in listed) == sorted([plain, with_stats])
    assert api.get("/v1/classifiers", headers=auth("beta")).json() == []
    assert api.get(f"/v1/classifiers/{plain}", headers=auth("beta")).status_code == 404
    pickle = api.post(
        "/v1/classifiers",
        files={"archive": ("clf.pt", b"\x80\x04not a zip", "application/octet-stream")},
        data={"spec": ClassifierSpec(num_classes=2, input_size=8).model_dump_json()},
        headers=auth("alpha"),
    )
    assert pickle.status_code == 415 and pickle.json()["error"]["code"] == "not_a_classifier_archive"
    bad_stats = api.post(
        "/v1/classifiers",
        files={
            "archive": ("clf.pt", torchscript_shaped_zip(), "application/octet-stream"),
            "hardness_stats": ("s", b"short", "application/octet-stream"),
        },
        data={"spec": ClassifierSpec(num_classes=2, input_size=8).model_dump_json()},
        headers=auth("alpha"),
    )
    assert bad_stats.status_code == 422 and bad_stats.json()["error"]["code"] == "invalid_hardness_stats"
    assert len(api.get("/v1/classifiers", headers=auth("alpha")).json()) == 2


def test_classifiers_have_a_name_and_date_and_their_tenant_deletes_them(api):
    spec = ClassifierSpec(num_classes=10, input_size=32).model_dump_json()
    named = api.post(
        "/v1/classifiers",
        files={"archive": ("digits.pt", torchscript_shaped_zip(), "application/octet-stream")},
        data={"spec": spec, "name": "digits cnn v1"},
        headers=auth("alpha"),
    ).json()
    unnamed = upload_classifier(api, num_classes=10, stats=safetensors_bytes())
    listed = api.get("/v1/classifiers", headers=auth("alpha")).json()
    expected = [(named["classifier_id"], "digits cnn v1"), (unnamed, "clf.pt")]
    assert [(c["classifier_id"], c["name"]) for c in listed] == expected
    assert all(c["created_at"] for c in listed) and listed[0]["created_at"] <= listed[1]["created_at"]
    assert api.delete(f"/v1/classifiers/{named['classifier_id']}", headers=auth("beta")).status_code == 404
    assert api.delete(f"/v1/classifiers/{named['classifier_id']}", headers=auth("alpha")).status_code == 204
    assert api.get(f"/v1/classifiers/{named['classifier_id']}", headers=auth("alpha")).status_code == 404
    assert [c["classifier_id"] for c in api.get("/v1/classifiers", headers=auth("alpha")).json()] == [unnamed]
    gone = api.delete(f"/v1/classifiers/{named['classifier_id']}", headers=auth("alpha"))
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    job = {**JOB, "criterion": "entropy", "classifier_id": named["classifier_id"]}
    assert api.post("/v1/generate", json=job, headers=auth("alpha")).status_code == 404


def test_a_classifier_deleted_between_the_existence_check_and_the_reads_is_404_not_500(api, monkeypatch):
    """A concurrent delete renames the folder away after `classifier_dir` found it: every reader says 404 (or
    leaves it out of a list), never a 500 from the vanished spec.json or meta.json."""
    classifier_id = upload_classifier(api)
    folder = ArtifactStore.classifier_dir  # the check passes as it did before the delete ran
    monkeypatch.setattr(
        ArtifactStore, "classifier_dir", lambda self, tenant, cid: self.tenant_dir(tenant) / "classifiers" / cid
    )
    assert api.delete(f"/v1/classifiers/{classifier_id}", headers=auth("alpha")).status_code == 204
    read = api.get(f"/v1/classifiers/{classifier_id}", headers=auth("alpha"))
    assert read.status_code == 404 and read.json()["error"]["code"] == "not_found"
    job = {**JOB, "criterion": "entropy", "classifier_id": classifier_id}
    assert api.post("/v1/generate", json=job, headers=auth("alpha")).status_code == 404
    assert api.post("/v1/batches", json={"jobs": [job]}, headers=auth("alpha")).status_code == 404
    # a folder half there (its files already gone) is left out of the list
    (api.app.state.store.tenant_dir("alpha") / "classifiers" / classifier_id).mkdir(parents=True)
    listed = api.get("/v1/classifiers", headers=auth("alpha"))
    assert listed.status_code == 200 and listed.json() == []
    monkeypatch.setattr(ArtifactStore, "classifier_dir", folder)
    # deleted by another request of the tenant's as soon as the upload stored it
    put = ArtifactStore.put_classifier

    def put_then_deleted(self, tenant, *args, **kwargs):
        stored = put(self, tenant, *args, **kwargs)
        self.delete_classifier(tenant, stored)
        return stored

    monkeypatch.setattr(ArtifactStore, "put_classifier", put_then_deleted)
    files = {"archive": ("clf.pt", torchscript_shaped_zip(), "application/octet-stream")}
    spec = ClassifierSpec(num_classes=10, input_size=32).model_dump_json()
    uploaded = api.post("/v1/classifiers", files=files, data={"spec": spec}, headers=auth("alpha"))
    assert uploaded.status_code == 404, uploaded.text


def test_the_gallery_filters_by_the_group_a_job_fills(api, records):
    """Class x group runs (NICO++'s contexts): each request names its group; the gallery lists the groups in scope
    and shows one group's images."""
    made = {}
    for index, group in enumerate(["grass", "snow", None]):
        body = {**JOB, "num_images": 1, "seed": index} | ({"group": group} if group else {})
        job_id = api.post("/v1/generate", json=body, headers=auth("alpha")).json()["job_id"]
        results = [{"image_id": f"{index}" * 64, "seed": index, "criterion_value": None, "predicted_class": 1}]
        run_as_a_worker(records, job_id, results)
        made[group] = results[0]["image_id"]
    page = api.get("/v1/views/gallery", headers=auth("alpha")).json()
    assert page["groups"] == ["grass", "snow"] and len(page["items"]) == 3
    snow = api.get("/v1/views/gallery", params={"group": "snow"}, headers=auth("alpha")).json()
    assert [item["image_id"] for item in snow["items"]] == [made["snow"]] and snow["items"][0]["group"] == "snow"
    assert snow["groups"] == ["grass", "snow"]  # the scope's groups, before the filter
    assert api.get("/v1/views/gallery", params={"group": "x" * 201}, headers=auth("alpha")).status_code == 422


def test_the_gallery_caches_final_jobs_only_and_for_their_tenant_only(redis_server, tmp_path, records):
    """Issue 19: a final job is parsed once (GalleryCache); a running job's images are read again each time, and a
    job whose record has expired leaves the gallery although it was cached."""
    settings = service_settings(redis_server, tmp_path / "short-lived", job_record_ttl_s=4)
    records = JobRecords(records.redis, settings.redis_prefix)
    with TestClient(create_app(settings)) as api:
        _gallery_cache_case(api, records)


def _gallery_cache_case(api, records) -> None:
    cache = api.app.state.gallery_cache
    began = time.time()
    running, final = (api.post("/v1/generate", json=JOB, headers=auth("alpha")).json()["job_id"] for _ in range(2))
    first = [ImageResult(image_id="c" * 64, seed=1)]
    for job_id in (running, final):
        assert records.transition(job_id, JobState.running, (JobState.queued,), owner="w")
        assert records.set_progress(job_id, "w", results_from=0, results=first)
    assert records.transition(final, JobState.finished, (JobState.running,), finished_at=2.0)

    def gallery_ids(tenant: str = "alpha") -> list[str]:
        page = api.get("/v1/views/gallery", headers=auth(tenant))
        assert page.status_code == 200, page.text
        return sorted(item["job_id"] for item in page.json()["items"])

    assert gallery_ids() == sorted([running, final])
    assert cache.get("alpha", final) is not None and cache.get("alpha", running) is None
    assert cache.get("beta", final) is None  # keyed by tenant too
    assert gallery_ids("beta") == []
    more = [ImageResult(image_id="d" * 64, seed=2)]
    assert records.set_progress(running, "w", results_from=1, results=more)  # the running job progressed
    assert gallery_ids() == sorted([running, running, final])
    time.sleep(max(0.0, began + 4.5 - time.time()))  # both records expire (FGS_JOB_RECORD_TTL_S = 4)
    assert gallery_ids() == [] and cache.get("alpha", final) is None
