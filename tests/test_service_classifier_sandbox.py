"""Classifier uploads through the live stack: normal torch.export archives serve feedback jobs; hostile archives
are refused with messages fgs wrote and run nothing, at the API and in a worker; the check's sandbox holds its
memory, CPU-time, concurrency, environment and network limits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fgs_common.artifact_store import ArtifactStore
from fgs_common.classifier_sandbox import sandbox_environment
from fgs_common.wire import JobState
from support import hostile_archives as hostile
from support.live_calls import generate, upload_classifier, wait_final
from support.stack import start_stack


def stored_files(data_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())


def assert_refused(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error["message"]


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static-batch", "dynamic-batch"])
def test_exported_classifier_uploads_and_serves_a_feedback_job(live_stack, tmp_path, dynamic_batch):
    archive = hostile.export_archive(tmp_path / "classifier.pt2", dynamic_batch=dynamic_batch)
    with live_stack.client("alpha") as client:
        uploaded = upload_classifier(client, archive.read_bytes(), hostile.SPEC, filename="classifier.pt2")
        assert uploaded.status_code == 201, uploaded.text
        classifier_id = uploaded.json()["classifier_id"]
        # 3 images: the static export (batch 2) runs in a full and a padded chunk
        job_id = generate(
            client, num_images=3, criterion="entropy", omega=0.5, classifier_id=classifier_id, steps=4, guidance_every=2
        )
        job = wait_final(client, job_id, timeout=300)
    assert job.state is JobState.finished, job
    assert len(job.results) == 3
    assert all(result.criterion_value is not None for result in job.results)


@pytest.mark.parametrize(
    "craft",
    [hostile.pt2_with_pickled_weight, hostile.pt2_with_code_in_shape_expression, hostile.pt2_with_pkl_member],
    ids=["pickled-weight", "code-in-shape-expression", "pkl-member"],
)
def test_hostile_pt2_upload_is_refused_and_nothing_runs(live_stack, tmp_path, craft):
    marker = tmp_path / "code-ran"
    legit = hostile.export_archive(tmp_path / "legit.pt2", dynamic_batch=False)
    archive = craft(legit, tmp_path / "hostile.pt2", marker)
    before = stored_files(live_stack.data_dir)
    with live_stack.client("beta") as client:
        response = upload_classifier(client, archive.read_bytes(), hostile.SPEC, filename="classifier.pt2")
    assert_refused(response, 422, "unsafe_classifier_archive")
    assert not marker.exists()
    assert stored_files(live_stack.data_dir) == before


def test_archive_reading_a_host_file_is_refused_without_its_bytes(live_stack, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN-4711")
    archive = hostile.script_archive(tmp_path / "reads.pt", hostile.ReadsFile(str(secret), 10))
    with live_stack.client("beta") as client:
        response = upload_classifier(client, archive.read_bytes(), hostile.SPEC)
    message = assert_refused(response, 422, "unsafe_classifier_archive")
    assert "from_file" in message
    assert "TOKEN" not in response.text and "4711" not in response.text


def test_worker_refuses_a_hostile_archive_that_reached_the_store(live_stack, tmp_path):
    """Where the API did not check (FGS_CLASSIFIER_CHECK off), the worker's first load refuses it; nothing runs."""
    marker = tmp_path / "code-ran"
    legit = hostile.export_archive(tmp_path / "legit.pt2", dynamic_batch=False)
    archive = hostile.pt2_with_pickled_weight(legit, tmp_path / "hostile.pt2", marker)
    classifier_id = ArtifactStore(live_stack.data_dir).put_classifier(
        "alpha", archive.read_bytes(), "archive.pt2", hostile.SPEC.model_dump_json().encode(), None
    )
    with live_stack.client("alpha") as client:
        job_id = generate(client, criterion="entropy", omega=0.5, classifier_id=classifier_id, steps=2)
        job = wait_final(client, job_id, timeout=300)
    assert job.state is JobState.failed, job
    assert "use_pickle" in job.error.message, job.error
    assert not marker.exists()


# ---------------------------------------------------------------- the sandbox's limits

CHECK_MEMORY_BYTES = 3 * 1024**3 // 2
CHECK_CPU_S = 6
MAX_UNPACKED_BYTES = 128 * 1024 * 1024


@pytest.fixture(scope="module")
def limited_stack(redis_server, tiny_model_dir, tmp_path_factory):
    """An API alone, with tight check limits: one check at a time, 1.5 GiB, 6 s of CPU, 128 MiB unpacked."""
    stack = start_stack(
        redis_server,
        tiny_model_dir,
        tmp_path_factory.mktemp("limited-stack"),
        workers=0,
        extra_env={
            "FGS_CLASSIFIER_CHECKS_AT_ONCE": "1",
            "FGS_CLASSIFIER_CHECK_RETRY_AFTER_S": "7",
            "FGS_CLASSIFIER_CHECK_MEMORY_BYTES": str(CHECK_MEMORY_BYTES),
            "FGS_CLASSIFIER_CHECK_CPU_S": str(CHECK_CPU_S),
            "FGS_MAX_CLASSIFIER_UNPACKED_BYTES": str(MAX_UNPACKED_BYTES),
        },
    )
    yield stack
    stack.close()


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_classifier_allocating_past_the_memory_limit_is_a_4xx(limited_stack, tmp_path):
    archive = hostile.script_archive(tmp_path / "allocates.pt", hostile.AllocatesHugely(gib=8))
    before = resident_bytes(limited_stack.api.pid)
    with limited_stack.client("alpha") as client:
        response = upload_classifier(client, archive.read_bytes(), hostile.SPEC)
    message = assert_refused(response, 422, "classifier_resource_limit")
    assert "memory" in message
    assert resident_bytes(limited_stack.api.pid) - before < 64 * 1024 * 1024


def test_zip_bomb_is_refused_before_it_is_unpacked(limited_stack, tmp_path):
    archive = hostile.script_archive(tmp_path / "tiny.pt", hostile.TinyClassifier())
    bomb = hostile.with_zip_bomb(archive, tmp_path / "bomb.pt", unpacked_bytes=2 * MAX_UNPACKED_BYTES)
    with limited_stack.client("alpha") as client:
        response = upload_classifier(client, bomb.read_bytes(), hostile.SPEC)
    assert "unpacks to" in assert_refused(response, 422, "classifier_archive_too_large")


def test_checks_beyond_a_tenants_share_get_429_and_a_spinning_classifier_hits_the_cpu_limit(limited_stack, tmp_path):
    """One check slot in all: alpha's second upload is its own 429; beta's waits for the slot (at most one check's
    time) and is checked, never refused for alpha's check (issue 19)."""
    spinning = hostile.script_archive(tmp_path / "spins.pt", hostile.SpinsForever()).read_bytes()
    tiny = hostile.script_archive(tmp_path / "tiny.pt", hostile.TinyClassifier()).read_bytes()
    first: dict[str, httpx.Response] = {}

    def upload_spinning() -> None:
        with limited_stack.client("alpha") as client:
            first["response"] = upload_classifier(client, spinning, hostile.SPEC)

    thread = threading.Thread(target=upload_spinning)
    thread.start()
    try:
        # The check's log exists from just before the check process starts until the upload answers.
        deadline = time.monotonic() + 60
        while not list(limited_stack.data_dir.glob(".classifier-check-*/check.log")):
            assert time.monotonic() < deadline and thread.is_alive(), first
            time.sleep(0.05)
        with limited_stack.client("alpha") as client:
            busy = upload_classifier(client, tiny, hostile.SPEC)
        assert_refused(busy, 429, "classifier_checks_busy")
        assert busy.headers["retry-after"] == "7"
        with limited_stack.client("beta") as client:
            waited = upload_classifier(client, tiny, hostile.SPEC)
        assert waited.status_code == 201, waited.text
        assert "response" in first  # beta's check ran once alpha's had ended
    finally:
        thread.join(timeout=120)
    message = assert_refused(first["response"], 422, "classifier_resource_limit")
    assert f"{CHECK_CPU_S} s of CPU" in message


def test_sandboxed_process_inherits_no_secrets_and_has_no_network(redis_server, tmp_path, monkeypatch):
    """What the check process starts with: the allow-listed environment, then confine_this_process."""
    monkeypatch.setenv("FGS_REDIS_URL", redis_server)
    monkeypatch.setenv("FGS_DEV_API_KEY", "dev-key-" + "x" * 24)
    monkeypatch.setenv("REDIS_PASSWORD", "hunter2")
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    probe = (
        "import json, os, socket\n"
        "from fgs_common.classifier_sandbox import confine_this_process\n"
        "isolated = confine_this_process(1 << 30, 10, 1 << 20)\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
        "    reached = True\n"
        "except OSError:\n"
        "    reached = False\n"
        "print(json.dumps({'env': dict(os.environ), 'isolated': isolated, 'reached': reached}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], env=sandbox_environment(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert not [name for name in report["env"] if name.startswith("FGS_") or "REDIS" in name]
    assert redis_server not in json.dumps(report["env"])
    if not report["isolated"]:
        pytest.skip("this kernel gives no network namespace (no CAP_SYS_ADMIN, no user namespaces)")
    assert report["reached"] is False


def test_an_upload_is_checked_when_the_data_directory_is_relative(redis_server, tmp_path, monkeypatch):
    """`fgs up` with the default FGS_DATA_DIR (.fgs, relative) refused every classifier: the check subprocess runs in
    its scratch folder, where the relative path named nothing (found by a newcomer's walk through the README)."""
    from support.service_settings import service_settings

    archive = hostile.export_archive(tmp_path / "classifier.pt2", dynamic_batch=True)
    monkeypatch.chdir(tmp_path)
    settings = service_settings(redis_server, Path("relative-data"), classifier_check=True)
    from fastapi.testclient import TestClient

    from fgs_service.app import create_app
    from support.stack import TENANT_KEYS

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TENANT_KEYS['alpha']}"}) as client:
        uploaded = upload_classifier(client, archive.read_bytes(), hostile.SPEC, filename="classifier.pt2")
    assert uploaded.status_code == 201, uploaded.text
    assert (tmp_path / "relative-data").is_dir()
