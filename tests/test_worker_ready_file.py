"""`fgs worker --ready-file`: the file appears once the model is loaded and goes away on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from support.stack import start_stack


def test_ready_file_written_when_loaded_and_removed_on_sigterm(redis_server, tiny_model_dir, tmp_path):
    stack = start_stack(redis_server, tiny_model_dir, tmp_path / "stack", workers=0)
    ready = tmp_path / "probe" / "fgs-ready"
    env = dict(stack.env, FGS_WORKER_NAME="ready-file-worker")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "fgs_service.cli", "worker", "--ready-file", str(ready)], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        assert ready.read_text().strip() == "ready-file-worker"
        assert [p.name for p in ready.parent.iterdir()] == ["fgs-ready"]  # no temp file left behind
        # the worker that wrote it is the one /readyz counts
        deadline = time.time() + 20
        while httpx.get(f"{stack.base_url}/readyz", timeout=5).json()["workers"] < 1 and time.time() < deadline:
            time.sleep(0.2)
        answer = {"status": "ready", "redis": True, "workers": 1, "store_writable": True, "store_error": None}
        assert httpx.get(f"{stack.base_url}/readyz", timeout=5).json() == answer
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, (code, (tmp_path / "worker.log").read_text()[-3000:])
        assert not ready.exists()
    finally:
        if worker.poll() is None:
            worker.kill()
        stack.close()


def test_readyz_is_200_with_zero_workers(redis_server, tiny_model_dir, tmp_path):
    """Workers scaled to zero must not take the API out of its Service: 200 with workers 0."""
    stack = start_stack(redis_server, tiny_model_dir, tmp_path / "stack", workers=0)
    try:
        response = httpx.get(f"{stack.base_url}/readyz", timeout=5)
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready, no live workers",
            "redis": True,
            "workers": 0,
            "store_writable": True,
            "store_error": None,
        }
    finally:
        stack.close()
