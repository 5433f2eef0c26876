"""Issue 19, findings 3 and 4, over real sockets to a real uvicorn on loopback: slow bodies without a key cost the
API nothing another tenant notices, a slow body with a key ends at the minimum rate, one tenant's progress
streams and classifier checks are capped at its own share, never at another tenant's expense."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time

import httpx
import pytest
import torch

from support import hostile_archives as hostile
from support.live_calls import generate, upload_classifier
from support.stack import start_stack

STREAMS_CAP = 20  # FGS_MAX_SSE_STREAMS_PER_TENANT here; the default (64) is asserted in test_service_request_gate
BODY_GRACE_S = 2
CHECK_CPU_S = 6


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir, tmp_path_factory):
    """An API alone (jobs stay queued: their streams stay open), with a small stream cap and body grace."""
    stack = start_stack(
        redis_server,
        tiny_model_dir,
        tmp_path_factory.mktemp("tenant-limits"),
        workers=0,
        extra_env={
            "FGS_MAX_SSE_STREAMS_PER_TENANT": str(STREAMS_CAP),
            "FGS_HTTP_BODY_TIMEOUT_S": str(BODY_GRACE_S),
            "FGS_CLASSIFIER_CHECK_CPU_S": str(CHECK_CPU_S),
        },
    )
    yield stack
    stack.close()


def address(stack) -> tuple[str, int]:
    host, port = stack.base_url.removeprefix("http://").split(":")
    return host, int(port)


def slow_request_head(path: str, length: int, key: str | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", f"Content-Length: {length}"]
    lines += [f"Authorization: Bearer {key}"] if key else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_500_slow_bodies_without_a_key_do_not_stop_another_tenant(stack):
    """Finding 3: 1,000 connections sending a declared 100 kB body a byte every 5 s, without a key, left another
    tenant 0 of 78 requests answered for 40 s. Now each gets its 401 as soon as its head is in, unread."""
    attackers: list[socket.socket] = []
    latencies: list[float] = []
    try:
        for _ in range(500):  # bounded; loopback only
            attacker = socket.create_connection(address(stack), timeout=30)
            attacker.sendall(slow_request_head("/v1/generate", 100_000, key=None) + b"{")
            attackers.append(attacker)
        with stack.client("beta") as client:
            for _ in range(40):
                began = time.perf_counter()
                assert client.get("/v1/jobs").status_code == 200
                latencies.append(time.perf_counter() - began)
            for attacker in attackers[::10]:  # a byte more, as the slow clients do: the API has moved on
                with contextlib.suppress(OSError):
                    attacker.sendall(b" ")
            assert client.get("/v1/jobs").status_code == 200
        answers = []
        for attacker in attackers:
            answers.append(attacker.recv(200).split(b"\r\n", 1)[0])
    finally:
        for attacker in attackers:
            attacker.close()
    assert answers == [b"HTTP/1.1 401 Unauthorized"] * 500
    median, worst = statistics.median(latencies), max(latencies)
    print(f"beta under 500 slow bodies: median {median * 1000:.0f} ms, max {worst:.2f} s")
    # margins for a loaded 2-core machine: an unloaded run answers in a few ms
    assert median < 0.5 and worst < 5


def test_a_slow_body_with_a_key_ends_at_the_minimum_rate(stack):
    """With a key the body is read, but it must come at FGS_HTTP_BODY_MIN_RATE after FGS_HTTP_BODY_TIMEOUT_S."""
    with socket.create_connection(address(stack), timeout=30) as slow:
        began = time.monotonic()
        slow.sendall(slow_request_head("/v1/generate", 100_000, key=stack.keys["alpha"]) + b"{")
        answer = slow.recv(4096)
        waited = time.monotonic() - began
        while chunk := slow.recv(4096):  # the body, until the server closes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and b"FGS_HTTP_BODY_MIN_RATE" in answer
    assert BODY_GRACE_S <= waited < BODY_GRACE_S + 10, waited


def test_one_tenants_progress_streams_are_capped_and_another_tenant_still_streams(stack):
    """Finding 4: 1,500 open streams of one tenant raised another's median latency from 7 ms to 1.3 s."""
    with stack.client("alpha") as alpha, stack.client("beta") as beta, contextlib.ExitStack() as open_streams:
        alpha_job, beta_job = generate(alpha), generate(beta)  # no worker: both stay queued, their streams open
        streams = []
        for _ in range(STREAMS_CAP):
            stream = open_streams.enter_context(alpha.stream("GET", f"/v1/jobs/{alpha_job}/events"))
            assert stream.status_code == 200
            streams.append(stream)
        refused = alpha.get(f"/v1/jobs/{alpha_job}/events")
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert "FGS_MAX_SSE_STREAMS_PER_TENANT" in refused.json()["error"]["message"]
        with beta.stream("GET", f"/v1/jobs/{beta_job}/events") as other:
            assert other.status_code == 200
            assert next(other.iter_lines()).startswith("event: progress")
            began = time.perf_counter()
            assert beta.get("/v1/jobs").status_code == 200
            assert time.perf_counter() - began < 2
        streams.pop().close()  # one ends: its slot comes back once the server sees the disconnect
        deadline = time.monotonic() + 10
        while True:
            with alpha.stream("GET", f"/v1/jobs/{alpha_job}/events") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.25)


def test_one_tenants_slow_checks_never_429_another_tenants_upload(stack, tmp_path):
    """Finding 4: two slow uploads of one tenant gave every other tenant 429 `classifier_checks_busy` for 100 s.
    Now a tenant has FGS_CLASSIFIER_CHECKS_PER_TENANT (1) of the FGS_CLASSIFIER_CHECKS_AT_ONCE (2) slots."""
    spinning = hostile.script_archive(tmp_path / "spins.pt", hostile.SpinsForever()).read_bytes()
    tiny = hostile.script_archive(tmp_path / "tiny.pt", hostile.TinyClassifier()).read_bytes()
    first: dict[str, httpx.Response] = {}

    def upload_spinning() -> None:
        with stack.client("alpha") as client:
            first["response"] = upload_classifier(client, spinning, hostile.SPEC)

    thread = threading.Thread(target=upload_spinning)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not list(stack.data_dir.glob(".classifier-check-*/check.log")):
            assert time.monotonic() < deadline and thread.is_alive(), first
            time.sleep(0.05)
        with stack.client("alpha") as client:
            own = upload_classifier(client, tiny, hostile.SPEC)
        assert own.status_code == 429, own.text
        assert own.json()["error"]["code"] == "classifier_checks_busy"
        assert "FGS_CLASSIFIER_CHECKS_PER_TENANT" in own.json()["error"]["message"]
        assert own.headers["retry-after"] == "10"
        with stack.client("beta") as client:
            other = upload_classifier(client, tiny, hostile.SPEC)
        assert other.status_code == 201, other.text
        assert thread.is_alive()  # beta's check ran while alpha's was still spinning
    finally:
        thread.join(timeout=120)
    assert first["response"].status_code == 422
    assert first["response"].json()["error"]["code"] == "classifier_resource_limit"


class PrintsForgedLogLines(hostile.TinyClassifier):
    """Writes lines that look like the service's own log on every forward, to stdout and, many, to stderr."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(20_000):
            print("ERROR fgs.service forged by a classifier")
        embedding = torch.relu(self.embed(torch.relu(self.conv(x)).mean(dim=(2, 3))))  # TorchScript: no super()
        return self.head(embedding), embedding


def test_a_checks_output_stays_out_of_the_api_log(stack, tmp_path):
    """Finding 6: a classifier's print() reached the log. The check's output goes to a file in its scratch folder
    (bounded by its 16 MiB file-size limit), removed with it; only a crash's tail is logged, by the server."""
    archive = hostile.script_archive(tmp_path / "prints.pt", PrintsForgedLogLines()).read_bytes()
    with stack.client("alpha") as client:
        response = upload_classifier(client, archive, hostile.SPEC)
    assert response.status_code == 201, response.text
    assert "forged by a classifier" not in (stack.log_dir / "api.log").read_text(errors="replace")
    assert list(stack.data_dir.glob(".classifier-check-*")) == []
