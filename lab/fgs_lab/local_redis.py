"""A private redis-server on a free loopback port, persistence off, for tests and benchmarks (never the one on 6379)."""

from __future__ import annotations

import shutil
import subprocess
import time

import redis

from fgs_common.loopback import free_port


def start_redis_server() -> tuple[subprocess.Popen, str]:
    """Start redis-server and wait until it answers; returns the process and its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                if client.ping():
                    return process, url
            except redis.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    process.kill()
    process.wait()
    raise RuntimeError("redis-server did not start")


def stop_redis_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)
