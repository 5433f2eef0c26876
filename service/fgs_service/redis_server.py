"""A redis-server of our own on a free loopback port: the local Redis of `fgs up`, and the private ones that
tests and benchmarks start (never the shared one on 6379)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from fgs_common.loopback import free_port


def start_redis_server(
    data_dir: Path | None = None, port: int | None = None, new_session: bool = False, timeout_s: float = 20.0
) -> tuple[subprocess.Popen, str]:
    """Start redis-server and return it with its URL once it answers PING.

    data_dir: keep an append-only file there, fsynced every second, so a restart on the same folder finds every
    queued job (at most the last second is lost); None: no persistence at all. new_session: a process group of its
    own, so a Ctrl-C meant for the caller does not reach it (`fgs up` stops it last, after the workers).
    Raises FileNotFoundError when redis-server is not installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    port = port or free_port()
    if data_dir is None:
        persistence = ["--appendonly", "no"]
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--dir", str(data_dir.resolve()), "--appendonly", "yes", "--appendfsync", "everysec"]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=new_session)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and process.poll() is None:
            try:
                if client.ping():
                    return process, url
            except (redis.ConnectionError, redis.BusyLoadingError):  # not listening yet, or replaying its AOF
                time.sleep(0.05)
    finally:
        client.close()
    process.kill()
    process.wait()
    raise RuntimeError(f"redis-server on port {port} did not answer within {timeout_s:.0f} s")


def stop_redis_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (Redis writes its append-only file and exits), SIGKILL if it takes longer than timeout_s."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
