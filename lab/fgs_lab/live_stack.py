"""fgs as separate real processes on loopback, for tests and benchmarks: uvicorn serving `fgs_service.app` and
`fgs_worker.main` workers (the two processes `fgs up` supervises), each started with an explicit environment.

The callers own the Redis (fgs_service.redis_server) and the environment (FGS_* settings); this module only
starts the processes the same way everywhere and waits until they serve.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx


def spawn_api(env: dict[str, str], port: int, log_path: Path | None = None, *uvicorn_options: str) -> subprocess.Popen:
    """uvicorn with the app factory on 127.0.0.1:port; its output goes to log_path (appended) or nowhere."""
    argv = [sys.executable, "-m", "uvicorn", "fgs_service.app:create_app", "--factory", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning", *uvicorn_options]
    return _spawn(argv, env, log_path)


def spawn_worker(env: dict[str, str], name: str, log_path: Path | None = None) -> subprocess.Popen:
    """One fgs worker named `name` (FGS_WORKER_NAME: its name in Redis, metrics and job records)."""
    return _spawn([sys.executable, "-m", "fgs_worker.main"], dict(env, FGS_WORKER_NAME=name), log_path)


def _spawn(argv: list[str], env: dict[str, str], log_path: Path | None) -> subprocess.Popen:
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    return subprocess.Popen(argv, env=env, stdout=log, stderr=log)


def wait_until_serving(
    base_url: str,
    processes: list[subprocess.Popen],
    timeout_s: float = 120.0,
    redis_url: str | None = None,
    prefix: str = "fgs",
    workers: int = 0,
) -> None:
    """Until the API answers /healthz and (with redis_url) `workers` workers under `prefix` have heartbeated.

    Fails at once, instead of at the timeout, when one of `processes` has exited."""
    import redis

    client = redis.Redis.from_url(redis_url) if redis_url else None
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = len(list(client.scan_iter(match=f"{prefix}:worker:*"))) if client is not None else 0
        try:
            healthy = httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and alive >= workers:
            return
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"{base_url} not serving (with {workers} workers) after {timeout_s:.0f} s")
