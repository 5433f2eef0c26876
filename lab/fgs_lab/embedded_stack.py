"""The embedded fgs stack (`fgs up`) started in the background for the demo and the Digits-LT experiment.

`fgs up` is run as a user runs it, on a free loopback port, with its data, state and API key under a work
directory; it is stopped with SIGINT (what Ctrl-C sends it), so its workers finish or drop their job cleanly.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from fgs_common.loopback import free_port


def fgs_command(name: str) -> str:
    """`fgs` or `fgs-client` from the interpreter's environment (the repository's .venv when run from it)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class EmbeddedStack(contextlib.AbstractContextManager):
    """A running `fgs up`: its URL, API key and the environment a `fgs-client` subprocess needs."""

    url: str
    api_key: str
    process: subprocess.Popen
    log_path: Path

    def client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
        env.update(FGS_URL=self.url, FGS_API_KEY=self.api_key)
        return env

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: `fgs up` stops its workers and API (and the Redis it started) and exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_embedded_stack(
    work_dir: Path, model: str, workers: int = 1, redis_url: str | None = None, timeout_s: float = 300
) -> EmbeddedStack:
    """Start `fgs up --model MODEL` on a free port with everything under work_dir; return once /readyz says ready.

    redis_url: a Redis to use (e.g. a private one in tests); None lets `fgs up` choose (the local default one if it
    answers, else a redis-server it starts itself). A fresh key prefix keeps runs apart on a shared Redis."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_key = "fgs-local-" + secrets.token_urlsafe(18)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(
        FGS_DATA_DIR=str(work_dir / "fgs-data"),
        FGS_STATE_DIR=str(work_dir / "fgs-state"),
        FGS_DEV_API_KEY=api_key,
        FGS_REDIS_PREFIX="fgs-local-" + uuid.uuid4().hex[:8],
        FGS_DEVICE="cpu" if not os.environ.get("FGS_DEVICE") else os.environ["FGS_DEVICE"],
    )
    if redis_url:
        env["FGS_REDIS_URL"] = redis_url
    log_path = work_dir / "fgs-up.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [
            fgs_command("fgs"),
            "up",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--model",
            model,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work_dir,
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the stack ourselves, in order
    )
    stack = EmbeddedStack(f"http://127.0.0.1:{port}", api_key, process, log_path)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"`fgs up` exited with {process.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{stack.url}/readyz", timeout=2).status_code == 200:
                    return stack
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.5)
        raise RuntimeError(f"`fgs up` not ready after {timeout_s:.0f} s; see {log_path}")
    except BaseException:
        stack.stop()
        raise


def run_client(stack: EmbeddedStack, *args: str, capture: bool = False) -> str:
    """Run `fgs-client ARGS` against the stack; its output goes to the terminal (progress bar visible) unless
    capture. Raises CalledProcessError on a non-zero exit."""
    result = subprocess.run(
        [fgs_command("fgs-client"), *args],
        env=stack.client_env(),
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["fgs-client", *args], output=result.stdout)
    return result.stdout or ""
