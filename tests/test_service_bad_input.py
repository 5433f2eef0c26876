"""Bad input: each is a 4xx with {"error": {"code", "message"}}, and nothing is stored or queued."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import httpx
import pytest
import redis
from rq import Queue

from support.live_calls import png_bytes, upload_classifier

GOOD = {"prompt": "a photo of digit four", "class_index": 4, "num_images": 1, "steps": 2, "guidance_every": 1}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb() -> bytes:
    """A 300-byte PNG that declares 100000 x 100000 RGB pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def stored_files(stack) -> list[str]:
    return sorted(str(p.relative_to(stack.data_dir)) for p in stack.data_dir.rglob("*") if p.is_file())


def queued_state(stack) -> tuple:
    client = redis.Redis.from_url(stack.redis_url)
    queues = sorted(client.smembers(f"{stack.prefix}:queues"))
    return (
        tuple((q, client.llen(Queue.redis_queue_namespace_prefix.encode() + q)) for q in queues),
        tuple(client.zcard(f"{stack.prefix}:tenant:{t}:jobs") for t in stack.keys),
        len(list(client.scan_iter(match=f"{stack.prefix}:job:*"))),
    )


@pytest.fixture
def nothing_changes(live_stack):
    """Asserts after the test that no file was stored and no job was queued."""
    files, queued = stored_files(live_stack), queued_state(live_stack)
    yield
    assert stored_files(live_stack) == files
    assert queued_state(live_stack) == queued


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code, error


def truncated_png() -> bytes:
    data = png_bytes(3, size=64)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"this is not an image at all", 415, "not_an_image"),
        (truncated_png(), 400, "corrupt_image"),
        (decompression_bomb(), 413, "image_too_large"),
        (b"\x89PNG" + b"\0" * (2 * 1024 * 1024 + 10), 413, "upload_too_large"),
    ],
    ids=["not-an-image", "truncated-png", "decompression-bomb", "over-size-limit"],
)
def test_bad_images(live_stack, nothing_changes, payload, status, code):
    with live_stack.client("beta") as client:
        assert_error(client.post("/v1/images", files={"file": ("x.png", payload, "image/png")}), status, code)


def test_bad_classifiers(live_stack, nothing_changes, classifier_files, tmp_path):
    import torch

    archive, spec = classifier_files
    with live_stack.client("beta") as client:
        bare_pickle = pickle.dumps({"weights": [1.0, 2.0]})
        assert_error(upload_classifier(client, bare_pickle, spec), 415, "not_a_classifier_archive")
        buffer = io.BytesIO()
        torch.save({"weight": torch.zeros(3)}, buffer)  # zip-format pickle, still a pickle
        assert_error(upload_classifier(client, buffer.getvalue(), spec), 415, "not_a_classifier_archive")
        wrong_classes = spec.model_copy(update={"num_classes": 7})
        response = upload_classifier(client, archive.read_bytes(), wrong_classes)
        assert_error(response, 422, "classifier_mismatch")
        assert "num_classes" in response.json()["error"]["message"]
        assert_error(upload_classifier(client, archive.read_bytes(), '{"num_classes": 10}'), 422, "invalid_spec")
        assert_error(upload_classifier(client, archive.read_bytes(), "not json"), 422, "invalid_spec")


@pytest.mark.parametrize(
    "change, status",
    [
        ({"criterion": "sharpness", "classifier_id": "0" * 64}, 422),
        ({"omega": float("nan")}, 422),
        ({"omega": float("inf")}, 422),
        ({"num_images": 0}, 422),
        ({"num_images": 10_000}, 422),
        ({"conditioning_image_ids": ["f" * 64]}, 404),
        ({"conditioning_image_ids": ["../../etc/passwd"]}, 404),
        ({"criterion": "entropy", "omega": 0.1, "classifier_id": "e" * 64}, 404),
        ({"prompt": ""}, 422),
        ({"unknown_field": 1}, 422),
    ],
    ids=[
        "unknown-criterion",
        "omega-nan",
        "omega-inf",
        "zero-images",
        "too-many-images",
        "unknown-image",
        "path-image-id",
        "unknown-classifier",
        "empty-prompt",
        "unknown-field",
    ],
)
def test_bad_generate_requests(live_stack, nothing_changes, change, status):
    body = dict(GOOD, **change)
    with live_stack.client("beta") as client:
        # json.dumps writes NaN/Infinity literally, as a careless client would
        import json

        response = client.post("/v1/generate", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert_error(response, status)
        batch = client.post(
            "/v1/batches", content=json.dumps({"jobs": [GOOD, body]}), headers={"Content-Type": "application/json"}
        )
        assert_error(batch, status)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_missing_or_wrong_api_key(live_stack, nothing_changes, headers):
    with httpx.Client(base_url=live_stack.base_url, headers=headers) as client:
        assert_error(client.post("/v1/generate", json=GOOD), 401, "unauthorized")
        assert_error(
            client.post("/v1/images", files={"file": ("x.png", png_bytes(), "image/png")}), 401, "unauthorized"
        )
        assert_error(client.get("/v1/jobs"), 401, "unauthorized")


def test_unknown_routes_and_ids_use_the_error_shape(live_stack):
    with live_stack.client("beta") as client:
        assert_error(client.get("/v1/jobs/does-not-exist"), 404, "not_found")
        assert_error(client.get("/v1/images/" + "a" * 64), 404, "not_found")
        assert_error(client.get("/v1/nothing-here"), 404)
        assert_error(client.get("/v1/batches/nope"), 404, "not_found")


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(live_stack, nothing_changes):
    """A Content-Length past the largest possible upload gets 413 at once; the server reads no body."""
    import json
    import re
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(live_stack.base_url)
    request = (
        f"POST /v1/classifiers HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {live_stack.keys['beta']}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 99999999999\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall(request.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"content-length: (\d+)", answer, re.I).group(1)
        ):
            chunk = conn.recv(65536)  # headers and body may come in separate segments
            assert chunk, f"connection closed before the whole answer: {answer!r}"
            answer += chunk
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "upload_too_large"
