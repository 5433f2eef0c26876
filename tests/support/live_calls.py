"""HTTP calls the service tests share: uploads, following a job, polling."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from fgs_common.wire import ClassifierSpec, JobProgressEvent, JobPublic, JobState


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_classifier(client, archive_bytes: bytes, spec: ClassifierSpec | str, filename: str = "classifier.pt"):
    spec_json = spec if isinstance(spec, str) else spec.model_dump_json()
    return client.post(
        "/v1/classifiers",
        files={"archive": (filename, archive_bytes, "application/octet-stream")},
        data={"spec": spec_json},
    )


def follow_events(client, job_id: str) -> list[JobProgressEvent | JobPublic]:
    """The events of the SSE stream until the server ends it: `progress` events, then the final `job` event."""
    events = []
    kind = {"progress": JobProgressEvent, "job": JobPublic}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append(kind[event].model_validate_json(line[len("data: ") :]))
    return events


def default_sigint() -> None:
    """In a child before it runs: SIGINT back to its default. A suite started in the background (`pytest &`,
    nohup in a script) ignores SIGINT, and children inherit an ignored signal: Python would then install no
    KeyboardInterrupt handler, and a Ctrl-C a test sends would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def client_process(*args: str, url: str, key: str, **env: str) -> subprocess.Popen:
    """`fgs-client ARGS` in a subprocess against `url` with `key`; stdout and stderr together, as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "fgs_client.cli", *args],
        env={**os.environ, "FGS_URL": url, "FGS_API_KEY": key, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )


def get_job(client, job_id: str) -> JobPublic:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return JobPublic.model_validate(response.json())


def wait_for(client, job_id: str, predicate, timeout: float = 120, poll: float = 0.05) -> JobPublic:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = get_job(client, job_id)
        if predicate(job):
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job_id} did not reach the expected state in {timeout} s; last: {job}")


def wait_final(client, job_id: str, timeout: float = 120) -> JobPublic:
    return wait_for(client, job_id, lambda j: j.state.is_terminal, timeout)


def generate(client, **overrides) -> str:
    body = {"prompt": "a photo of digit one", "class_index": 1, "num_images": 1, "steps": 2, "guidance_every": 1}
    body.update(overrides)
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


__all__ = [
    "JobState",
    "png_bytes",
    "upload_classifier",
    "client_process",
    "follow_events",
    "get_job",
    "wait_for",
    "wait_final",
    "generate",
]


def recorded_calls(client, monkeypatch) -> list[tuple[str, str]]:
    """The (method, path) of every request an fgs_client.Client sends from now on (the calls still go out)."""
    calls = []
    request = client._http.request

    def recorded(method, path, **kwargs):
        calls.append((method, path))
        return request(method, path, **kwargs)

    monkeypatch.setattr(client._http, "request", recorded)
    return calls
