"""bench/stack_under_load.py follows each job by SSE under one overall deadline, inside a stream too: the 30-minute
soak's client followed a job nobody would end through an SSE stream of keep-alives forever. Real parts: uvicorn, a
private redis-server, no worker (the job stays queued, its stream sends only keep-alives)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

import httpx
import pytest

from support.live_calls import JobState, generate, get_job
from support.stack import start_stack

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]


def load_bench_module():
    spec = importlib.util.spec_from_file_location("stack_under_load", REPO / "bench" / "stack_under_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_following_a_job_by_sse_gives_up_at_the_deadline_inside_an_open_stream(redis_server, tiny_model_dir, tmp_path):
    bench = load_bench_module()
    stack = start_stack(redis_server, tiny_model_dir, tmp_path, workers=0)
    try:
        with stack.client("alpha") as client:
            job_id = generate(client)

        async def follow():
            headers = {"Authorization": f"Bearer {stack.keys['alpha']}"}
            async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as http:

                async def call(*args, **kwargs):
                    raise AssertionError("the SSE follow polls nothing")

                return await bench._follow(http, call, job_id, True, bench.LoadLog(), follow_s=3.0)

        began = time.monotonic()
        assert asyncio.run(asyncio.wait_for(follow(), timeout=60)) == ("unknown", [])
        assert time.monotonic() - began < 10
        with stack.client("alpha") as client:
            assert get_job(client, job_id).state is JobState.queued  # the stream was open, the job never ran
    finally:
        stack.close()
