"""Failures are told apart by type (fgs_common.exceptions): an InvalidJob fails at once; anything else,
a ValueError from inside the model included, is retried by RQ with backoff and can then succeed.

Real parts throughout: the API app in process (TestClient) on a private redis-server, the tiny model, and the
real RQ worker class running jobs in this process, so RQ's own retry path is what is exercised. The one
injected fault is a torch forward pre-hook on the real UNet that raises a ValueError once, as a transient
error inside torch or diffusers would.
"""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from rq.defaults import RQ_KEY_PREFIX

from fgs_common.job_records import Keys
from fgs_common.wire import ClassifierSpec, JobPublic, JobState
from support.worker_loop import in_process_settings, run_next_job, start_worker

API_KEY = "key-failures-" + "f" * 24


@pytest.fixture
def setup(redis_server, tiny_model_dir, tmp_path):
    """(API client, in-process worker, settings) on a prefix of this test's own."""
    from fgs_service.app import create_app

    settings = in_process_settings(redis_server, tiny_model_dir, tmp_path, "failures", dev_api_key=API_KEY)
    worker = start_worker(settings, "failures")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client, worker, settings
    worker.register_death()


def submit(client, **fields) -> str:
    body = {"prompt": "a handwritten digit", "class_index": 1, "num_images": 1, "steps": 2, "guidance_every": 1}
    response = client.post("/v1/generate", json=body | fields)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def scheduled_retries(settings) -> int:
    """Jobs RQ holds for a retry after their backoff (the dev tenant queue's scheduled registry)."""
    queue_name = Keys(settings.redis_prefix).queue_name("dev")
    return redis.Redis.from_url(settings.redis_url).zcard(f"{RQ_KEY_PREFIX}:scheduled:{queue_name}")


def job(client, job_id: str) -> JobPublic:
    return JobPublic.model_validate(client.get(f"/v1/jobs/{job_id}").json())


def test_a_value_error_inside_the_model_is_retried_and_then_succeeds(setup):
    client, worker, settings = setup
    unet = worker.runtime.sampler.pipeline.unet
    calls = []

    def fail_once(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("transient failure inside the UNet forward")

    handle = unet.register_forward_pre_hook(fail_once)
    try:
        job_id = submit(client)
        run_next_job(worker)
        first = job(client, job_id)
        # back in the queue with the reason, not failed: RQ holds the retry for its backoff
        assert first.state is JobState.queued, first
        assert first.error.code == "retrying" and "ValueError: transient failure" in first.error.message
        assert scheduled_retries(settings) == 1
        run_next_job(worker)
    finally:
        handle.remove()
    done = job(client, job_id)
    assert done.state is JobState.finished, done
    assert len(done.results) == 1 and client.get(f"/v1/images/{done.results[0].image_id}").status_code == 200
    assert len(calls) >= 2  # the UNet ran again on the retry


def test_an_invalid_job_fails_at_once_with_its_message(setup):
    client, worker, settings = setup
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    uploaded = client.post("/v1/images", files={"file": ("red.png", buffer.getvalue(), "image/png")})
    assert uploaded.status_code == 201, uploaded.text
    image_id = uploaded.json()["image_id"]
    job_id = submit(client, conditioning_image_ids=[image_id])
    # the image goes away for good before a worker takes the job
    path = worker.runtime.store.image_path("dev", image_id)
    path.unlink()

    run_next_job(worker)
    failed = job(client, job_id)
    assert failed.state is JobState.failed, failed
    assert failed.error.code == "artifact_gone"
    assert failed.error.message == f"conditioning image {image_id} is no longer in the artifact store"
    assert scheduled_retries(settings) == 0
    raw = redis.Redis.from_url(settings.redis_url)
    assert json.loads(raw.hget(f"{settings.redis_prefix}:job:{job_id}", "error"))["code"] == "artifact_gone"


def upload_unchecked_classifier(client) -> str:
    """An archive in TorchScript's layout that never runs (the upload check is off here); its id."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as members:
        members.writestr("clf/constants.pkl", b"")
        members.writestr("clf/code/__torch__.py", b"")
    spec = ClassifierSpec(num_classes=10, input_size=32).model_dump_json()
    uploaded = client.post(
        "/v1/classifiers",
        files={"archive": ("clf.pt", archive.getvalue(), "application/octet-stream")},
        data={"spec": spec},
    )
    assert uploaded.status_code == 201, uploaded.text
    return uploaded.json()["classifier_id"]


def test_a_queued_job_whose_classifier_was_deleted_fails_at_once_saying_so(setup):
    client, worker, settings = setup
    classifier_id = upload_unchecked_classifier(client)
    job_id = submit(client, criterion="entropy", omega=0.03, classifier_id=classifier_id)
    assert client.delete(f"/v1/classifiers/{classifier_id}").status_code == 204  # while the job is queued

    run_next_job(worker)
    failed = job(client, job_id)
    assert failed.state is JobState.failed, failed
    assert failed.error.code == "artifact_gone"
    assert failed.error.message == (
        f"classifier {classifier_id} is no longer in the artifact store (deleted by its tenant?): upload it again"
    )
    assert scheduled_retries(settings) == 0  # not retried: it cannot come back by itself


def test_a_classifier_deleted_while_the_worker_reads_it_fails_the_job_saying_so(setup):
    """The tenant's delete lands between the worker finding the classifier's folder and reading its archive."""
    client, worker, settings = setup
    classifier_id = upload_unchecked_classifier(client)
    job_id = submit(client, criterion="entropy", omega=0.03, classifier_id=classifier_id)
    store = worker.runtime.store
    folder = store.classifier_dir("dev", classifier_id)
    store.classifier_archive(folder).unlink()  # half of a delete: the folder and spec are still there

    run_next_job(worker)
    failed = job(client, job_id)
    assert failed.state is JobState.failed and failed.error.code == "artifact_gone", failed
    assert "no longer in the artifact store" in failed.error.message
    assert scheduled_retries(settings) == 0
