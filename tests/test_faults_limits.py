"""Limits (issue 10, defects 7 and 8): bounded numbers in the wire schema, bodies capped while they stream, a full
disk answered with 507 and reported by /readyz. Real uvicorn, real Redis, real sockets, a real full filesystem.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from fgs_common.loopback import free_port
from support.live_calls import png_bytes
from support.stack import start_stack

GOOD = {"prompt": "a photo of digit four", "class_index": 4, "num_images": 1, "steps": 2, "guidance_every": 1}


def assert_422(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()["error"]
    assert body["code"] == "invalid_request" and field in body["message"], body


@pytest.mark.parametrize("offset", ["1e30", str(10**30), "-1", str(2**63)])
def test_a_list_offset_out_of_range_is_422(live_stack, offset):
    with live_stack.client("alpha") as client:
        assert_422(client.get("/v1/jobs", params={"offset": offset}), "offset")


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"class_index": int("9" * 4000)}, "class_index"),
        ({"class_index": 10**7}, "class_index"),
        ({"omega": 1e308}, "omega"),
        ({"gamma": 1e308}, "gamma"),
        ({"seed": 2**63 - 2, "num_images": 5}, "seed"),
    ],
)
def test_numbers_past_the_schema_bounds_are_422_and_nothing_is_queued(live_stack, fields, name):
    with live_stack.client("alpha") as client:
        before = client.get("/v1/jobs", params={"limit": 1000}).json()["count"]
        # a 4,000-digit integer is valid JSON; send it as text, as a client would
        body = json.dumps(GOOD | {k: v for k, v in fields.items() if k != "class_index"})
        if "class_index" in fields:
            body = body.replace('"class_index": 4', f'"class_index": {fields["class_index"]}')
        response = client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
        assert_422(response, name)
        assert client.get("/v1/jobs", params={"limit": 1000}).json()["count"] == before


def test_the_largest_seed_range_is_accepted(live_stack):
    with live_stack.client("alpha") as client:
        response = client.post("/v1/generate", json=GOOD | {"seed": 2**63 - 5, "num_images": 5})
        assert response.status_code == 202, response.text
        client.delete(f"/v1/jobs/{response.json()['job_id']}")


def test_an_image_too_big_for_the_model_is_422_and_the_limit_is_published(live_stack):
    with live_stack.client("alpha") as client:
        info = client.get("/v1/model")
        assert info.status_code == 200, info.text
        limit = info.json()["max_pixels_per_image"]
        native = info.json()["native_width"] * info.json()["native_height"]
        assert native <= limit < 2048 * 2048
        before = client.get("/v1/jobs", params={"limit": 1000}).json()["count"]
        response = client.post("/v1/generate", json=GOOD | {"width": 2048, "height": 2048})
        assert response.status_code == 422 and response.json()["error"]["code"] == "image_too_large", response.text
        assert str(limit) in response.json()["error"]["message"]
        assert client.get("/v1/jobs", params={"limit": 1000}).json()["count"] == before


def _high_water_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


MULTIPART_START = (
    b'--fgs-boundary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


def _send_chunked(
    port: int, path: str, total: int, key: str, content_type: str = "application/json", start: bytes = b""
) -> tuple[int, bytes]:
    """Stream `start` and then `total` bytes as a chunked body with no Content-Length, until the server answers
    or hangs up; returns (bytes sent, what the server answered)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    if start:
        sock.sendall(f"{len(start):x}\r\n".encode() + start + b"\r\n")
    chunk_size = 1 << 20
    chunk = f"{chunk_size:x}\r\n".encode() + b" " * chunk_size + b"\r\n"
    sent = 0
    answer = b""
    try:
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(chunk)
            sent += chunk_size
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in answer:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    return sent, answer


def test_a_1_gib_chunked_body_is_refused_without_the_api_growing_past_the_cap(redis_server, tiny_model_dir, tmp_path):
    cap = 8 * 1024 * 1024
    env = {"FGS_MAX_JSON_BODY_BYTES": str(cap)}
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=0, extra_env=env)
    try:
        port = int(stack.base_url.rsplit(":", 1)[1])
        before = _high_water_rss_bytes(stack.api.pid)
        sent, answer = _send_chunked(port, "/v1/generate", 1 << 30, stack.keys["alpha"])
        grown = _high_water_rss_bytes(stack.api.pid) - before
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 256 * 1024 * 1024, f"the API read {sent} bytes of a body capped at {cap}"
        # the body parser may hold the capped body twice (chunks, then joined) on top of the socket buffers
        assert grown < 4 * cap + 32 * 1024 * 1024, f"API memory grew by {grown / 2**20:.0f} MiB"
        # the same cap for a multipart image upload sent chunked (its own cap: FGS_MAX_UPLOAD_BYTES, 2 MiB here)
        sent, answer = _send_chunked(
            port,
            "/v1/images",
            1 << 30,
            stack.keys["alpha"],
            "multipart/form-data; boundary=fgs-boundary",
            MULTIPART_START,
        )
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 256 * 1024 * 1024
        assert stack.api.poll() is None
    finally:
        stack.close()


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MiB tmpfs (needs mount rights: root in a container that allows it), filled up by the test."""
    mount_point = tmp_path / "small-volume"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_507_and_readyz_reports_the_store_unwritable(redis_server, tiny_model_dir, tmp_path, full_disk):
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "data").symlink_to(full_disk)  # start_stack's FGS_DATA_DIR, on the small volume
    stack = start_stack(redis_server, tiny_model_dir, tmp_path / "stack", workers=0)
    try:
        with stack.client("alpha") as client:
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/images", files={"file": ("a.png", png_bytes(1), "image/png")}).status_code == 201
            filler = full_disk / f".filler-{uuid.uuid4().hex}"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 65536)
            except OSError:
                pass  # full
            finally:
                os.close(fd)
            response = client.post("/v1/images", files={"file": ("b.png", png_bytes(2), "image/png")})
            assert response.status_code == 507, response.text
            assert response.json()["error"]["code"] == "insufficient_storage"
            assert "no space" in response.json()["error"]["message"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["store_writable"] is False, ready.text
            filler.unlink()
            time.sleep(0.1)
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/images", files={"file": ("b.png", png_bytes(2), "image/png")}).status_code == 201
    finally:
        stack.close()


def test_a_connection_that_never_finishes_its_request_head_is_closed(redis_server, tmp_path):
    """Slowloris: `fgs api` closes a connection whose headers are still incomplete after the header timeout."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(
        FGS_REDIS_URL=redis_server, FGS_DATA_DIR=str(tmp_path), FGS_DEV_API_KEY="k" * 32, FGS_HTTP_HEADER_TIMEOUT_S="2"
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "fgs_service.cli", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline, "fgs api did not start"
                time.sleep(0.2)
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        slow.settimeout(15)
        began = time.time()
        assert slow.recv(100) == b"", "the server answered a request whose head never ended"
        assert time.time() - began < 8
        slow.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # and normal requests still work
            assert client.get("/healthz").status_code == 200
            time.sleep(3)  # past the header timeout, on a kept-alive connection
            assert client.get("/healthz").status_code == 200
    finally:
        api.terminate()
        api.wait(timeout=30)
