"""A live stack for end-to-end tests: uvicorn and worker subprocesses on a private Redis prefix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fgs_common.loopback import free_port
from fgs_lab.live_stack import spawn_api, spawn_worker, wait_until_serving

TENANT_KEYS = {"alpha": "key-alpha-" + "a" * 24, "beta": "key-beta-" + "b" * 24, "capped": "key-capped-" + "c" * 24}
CAPPED_MAX_IMAGES = 10


def keys_document() -> str:
    """The keys file (FGS_API_KEYS_FILE / FGS_API_KEYS) of the test tenants; `capped` may queue CAPPED_MAX_IMAGES."""
    from fgs_service.auth import hash_key

    tenants = [
        {"name": name, "key_sha256": [hash_key(key)]}
        | ({"max_queued_images": CAPPED_MAX_IMAGES} if name == "capped" else {})
        for name, key in TENANT_KEYS.items()
    ]
    return json.dumps({"tenants": tenants})


@dataclass
class Stack:
    """A running API and its workers on one Redis prefix."""

    base_url: str
    keys: dict[str, str]
    redis_url: str
    prefix: str
    data_dir: Path
    env: dict[str, str]
    api: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_dir: Path | None = None

    def client(self, tenant: str = "alpha", **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def spawn_worker(self, name: str | None = None) -> subprocess.Popen:
        name = name or f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}"
        log = self.log_dir / f"worker-{name}.log" if self.log_dir else None
        process = spawn_worker(self.env, name, log)
        self.workers.append(process)
        return process

    def wait_ready(self, workers: int, timeout: float = 120) -> None:
        """Until the API answers and `workers` workers have sent heartbeats."""
        wait_until_serving(self.base_url, [self.api, *self.workers], timeout, self.redis_url, self.prefix, workers)

    def close(self) -> None:
        for process in self.workers + [self.api]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers + [self.api]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def start_stack(
    redis_url: str, model_dir: Path, root: Path, workers: int = 2, extra_env: dict[str, str] | None = None
) -> Stack:
    """Start uvicorn on a free loopback port and `workers` worker subprocesses, on a fresh Redis prefix."""
    root.mkdir(parents=True, exist_ok=True)
    keys_file = root / "keys.json"
    keys_file.write_text(keys_document())
    prefix = "fgs-test-" + uuid.uuid4().hex[:8]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(
        FGS_REDIS_URL=redis_url,
        FGS_REDIS_PREFIX=prefix,
        FGS_DATA_DIR=str(root / "data"),
        FGS_API_KEYS_FILE=str(keys_file),
        FGS_MODEL=str(model_dir),
        FGS_DEVICE="cpu",
        FGS_HEARTBEAT_S="1",
        FGS_JOB_RETRIES="1",
        FGS_RETRY_BACKOFF_S="[1]",
        FGS_MAX_BATCH_IMAGES="8",
        FGS_MAX_UPLOAD_BYTES=str(2 * 1024 * 1024),
        OMP_NUM_THREADS="1",
    )
    env.update(extra_env or {})  # after: a test may override any of the above
    log_dir = root / "logs"
    log_dir.mkdir(exist_ok=True)
    api = spawn_api(env, port, log_dir / "api.log", "--timeout-keep-alive", "120")
    base_url = f"http://127.0.0.1:{port}"
    stack = Stack(base_url, dict(TENANT_KEYS), redis_url, prefix, root / "data", env, api, log_dir=log_dir)
    for _ in range(workers):
        stack.spawn_worker()
    try:
        stack.wait_ready(workers)
    except BaseException:
        stack.close()
        raise
    return stack
