"""`fgs up`: one command starts Redis (when none answers), the API and a worker; Ctrl-C stops all of them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis

from fgs_common.loopback import free_port
from fgs_service.cli import _without_password
from fgs_service.redis_server import start_redis_server, stop_redis_server
from support.live_calls import JobState, generate, wait_final
from support.stack import start_stack

pytestmark = pytest.mark.stack  # starts `fgs up`


def test_fgs_up_runs_the_stack_and_ctrl_c_stops_everything(tiny_model_dir, tmp_path):
    api_port, nothing_there = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(
        FGS_DEFAULT_REDIS_URL=f"redis://127.0.0.1:{nothing_there}/0",  # no Redis answers there: fgs up starts its own
        FGS_STATE_DIR=str(tmp_path / "state"),
        FGS_DATA_DIR=str(tmp_path / "data"),
        FGS_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    command = [
        sys.executable,
        "-m",
        "fgs_service.cli",
        "up",
        "--port",
        str(api_port),
        "--workers",
        "1",
        "--model",
        str(tiny_model_dir),
    ]
    up = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Read fgs up's output (its children's logs too) all the time: a pipe nobody reads fills up and blocks
    # the writers, and a blocked child cannot shut down.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not any(line.startswith("API key:") for line in lines):
            assert up.poll() is None and time.time() < deadline, "fgs up did not print its API key:\n" + "".join(lines)
            time.sleep(0.1)
        output = "".join(lines)
        redis_url = re.search(r"started redis-server at (\S+)", output).group(1)
        # the banner says what it joined: which Redis, under which prefixes, with which folders
        banner = f"Redis {redis_url} (started above), key prefix fgs (RQ's: fgs:rq), data {tmp_path / 'data'}, "
        assert banner + f"state {tmp_path / 'state'}" in output, output
        api_key = re.search(r"API key: (\S+)", output).group(1)
        assert "an admin key: no keys file is given" in output  # the banner says what the dev key may do
        base = f"http://127.0.0.1:{api_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as client:
            job_id = generate(client, steps=3, guidance_every=1)
            assert wait_final(client, job_id).state is JobState.finished
        assert (tmp_path / "state" / "redis").is_dir()
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            tree = subprocess.run(
                ["ps", "-o", "pid,ppid,stat,etime,args", "--ppid", str(up.pid)], capture_output=True, text=True
            ).stdout
            up.kill()
            raise AssertionError(
                f"fgs up still running 120 s after Ctrl-C; its children:\n{tree}\noutput tail:\n{''.join(lines[-40:])}"
            ) from None
        assert code == 0, "".join(lines[-40:])
    for url in (f"{base}/healthz",):
        try:
            httpx.get(url, timeout=2)
            raise AssertionError("the API still answers after Ctrl-C")
        except httpx.ConnectError:
            pass
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
        raise AssertionError("the redis-server fgs up started still answers after Ctrl-C")
    except redis.ConnectionError:
        pass


def test_two_deployments_on_one_redis_keep_every_key_under_their_own_prefix(tiny_model_dir, tmp_path):
    """Two stacks, one Redis, different FGS_REDIS_PREFIX: each runs its own jobs, none of the other's, and RQ's own
    keys (queues, job hashes, registries, workers) live under each one's prefix too: nothing under a bare `rq:`."""
    process, url = start_redis_server()
    stacks = []
    try:
        # Each child derives RQ_KEY_PREFIX from its own FGS_REDIS_PREFIX, as separately started deployments do (this
        # test process exported its own for the children it starts: not inherited here).
        plain = {"RQ_KEY_PREFIX": ""}
        a = start_stack(url, tiny_model_dir, tmp_path / "a", workers=1, extra_env=plain)
        stacks.append(a)
        b = start_stack(url, tiny_model_dir, tmp_path / "b", workers=0, extra_env=plain)
        stacks.append(b)
        with a.client() as client_a, b.client() as client_b:
            job_b = generate(client_b, steps=2)  # B has no worker: A's must never take it
            job_a = generate(client_a, steps=2)
            assert wait_final(client_a, job_a).state is JobState.finished
            time.sleep(2.0)  # A's worker polls its queues every second
            assert client_b.get(f"/v1/jobs/{job_b}").json()["state"] == "queued"
            assert client_a.get(f"/v1/jobs/{job_b}").status_code == 404
        keys = [key.decode() for key in redis.Redis.from_url(url).keys("*")]
        assert any(key.startswith(f"{a.prefix}:rq:job:") for key in keys)
        assert any(key.startswith(f"{b.prefix}:rq:queue:") for key in keys)
        outside = [key for key in keys if not key.startswith((f"{a.prefix}:", f"{b.prefix}:"))]
        assert outside == []
    finally:
        for stack in stacks:
            stack.close()
        stop_redis_server(process)


def test_the_banner_never_prints_a_redis_password():
    assert _without_password("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert _without_password("rediss://fgs:s3cret@cache:6380/1") == "rediss://fgs:***@cache:6380/1"
    assert _without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
