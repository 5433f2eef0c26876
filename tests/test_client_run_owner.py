"""One run, one owner: a live `fgs-client balance` holds its --out; `fgs-client cancel` stops it instead of racing
it, and a job canceled on the service is never resubmitted. The real client in subprocesses against a live API
with no worker, so every job stays queued until it is canceled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_client.run_owner import STOP_NAME, RunHeld, RunOwner, take_over
from support.dataset_trees import write_image
from support.live_calls import client_process
from support.stack import start_stack

CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir, tmp_path_factory):
    live = start_stack(redis_server, tiny_model_dir, tmp_path_factory.mktemp("owner"), workers=0)
    yield live
    live.close()


def small_set(root: Path) -> Path:
    for index, name in enumerate(CLASSES):
        for i in range(3 if index == 0 else 1):
            write_image(root / name / f"{i}.png", value=20 * index + i)
    return root


def balance(stack, root: Path, out: Path, seed: int) -> subprocess.Popen:
    """3 + 1 + 1 images, target 3: 4 images to add, one job of 1 image each (a run of 4 jobs in one chunk). Each
    test its own `seed`: another plan, whose Idempotency-Keys do not give back an earlier test's jobs."""
    return client_process(
        "balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(out), "--target", "3",
        "--seed", str(seed), "--images-per-job", "1", "--steps", "2", "--guidance-every", "1", "--no-progress",
        url=stack.base_url, key=stack.keys["alpha"], COLUMNS="200",
    )  # fmt: skip


def run_cli(stack, *args: str) -> tuple[int, str]:
    process = client_process(*args, url=stack.base_url, key=stack.keys["alpha"], COLUMNS="200")
    output, _ = process.communicate(timeout=120)
    return process.returncode, " ".join(output.split())


def submitted_rows(out: Path):
    if not (out / STATE_NAME).is_file():
        return []
    state = BalanceState(out / STATE_NAME)
    try:
        return state.rows("submitted")
    finally:
        state.close()


def wait_for_submission(out: Path, jobs: int, process: subprocess.Popen) -> list[str]:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        rows = submitted_rows(out)
        if len(rows) == jobs:
            return [row.job_id for row in rows]
        time.sleep(0.2)
    raise AssertionError(f"the run did not submit {jobs} jobs: {process.communicate(timeout=30)[0]}")


def tenant_jobs(stack) -> dict[str, str]:
    with stack.client("alpha") as client:
        return {
            job["job_id"]: job["state"] for job in client.get("/v1/views/jobs", params={"limit": 1000}).json()["jobs"]
        }


def test_cancel_during_a_live_balance_stops_it_and_leaves_every_job_canceled_none_resubmitted(stack, tmp_path):
    root = small_set(tmp_path / "data")
    out = tmp_path / "out"
    before = set(tenant_jobs(stack))
    running = balance(stack, root, out, seed=1)
    try:
        job_ids = wait_for_submission(out, 4, running)
        # a second client on the same --out is refused, naming the owner
        code, output = run_cli(
            stack, "balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(out), "--target", "3",
            "--images-per-job", "1", "--steps", "2", "--guidance-every", "1", "--no-progress",
        )  # fmt: skip
        assert code == 2 and f"is held by another balance run: fgs-client PID {running.pid}" in output, output
        code, output = run_cli(stack, "cancel", "--out", str(out))
        assert code == 0 and "canceled 4 jobs" in output, output
        stopped, _ = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    stopped = " ".join(stopped.split())
    assert running.returncode == 130 and "stopped: fgs-client cancel --out" in stopped, stopped
    time.sleep(1.0)  # a client racing the cancel resubmitted within a poll (0.5 s)
    new = {job_id: state for job_id, state in tenant_jobs(stack).items() if job_id not in before}
    assert sorted(new) == sorted(job_ids) and set(new.values()) == {"canceled"}
    assert not (out / STOP_NAME).exists()


def test_jobs_canceled_on_the_service_are_reported_not_resubmitted_and_a_rerun_resumes_them(stack, tmp_path):
    root = small_set(tmp_path / "data")
    out = tmp_path / "out"
    before = set(tenant_jobs(stack))
    running = balance(stack, root, out, seed=2)
    try:
        job_ids = wait_for_submission(out, 4, running)
        with stack.client("alpha") as client:  # canceled from elsewhere: the page, the API
            batch_id = submitted_rows(out)[0].batch_id
            assert client.delete(f"/v1/batches/{batch_id}").json()["canceled"] == 4
        output, _ = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    output = " ".join(output.split())
    assert running.returncode == 1 and "4 jobs were canceled on the service and not resubmitted" in output, output
    assert "rerun the same command to generate them" in output
    new = {job_id: state for job_id, state in tenant_jobs(stack).items() if job_id not in before}
    assert sorted(new) == sorted(job_ids) and set(new.values()) == {"canceled"}
    # a rerun is how a user asks for them again: resubmitted once each (no worker: they wait, queued)
    rerun = balance(stack, root, out, seed=2)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(set(tenant_jobs(stack)) - before) < 8:
            time.sleep(0.2)
        time.sleep(1.0)
        new = {job_id: state for job_id, state in tenant_jobs(stack).items() if job_id not in before}
        assert len(new) == 8 and sorted(new.values()) == ["canceled"] * 4 + ["queued"] * 4
    finally:
        rerun.send_signal(signal.SIGINT)
        rerun.communicate(timeout=60)
    run_cli(stack, "cancel", "--out", str(out))


HOLDER = """
import sys, time
from pathlib import Path
from fgs_client.run_owner import RunOwner
RunOwner(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_cancel_refuses_naming_the_pid_of_an_owner_that_does_not_stop(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunHeld) as refused:
            take_over(tmp_path, wait_s=0.5)
        assert f"held by fgs-client PID {holder.pid} on " in str(refused.value)
        assert f"kill {holder.pid}" in str(refused.value)
        assert not (tmp_path / STOP_NAME).exists()  # no stop left for a later run
    finally:
        holder.kill()
        holder.wait()
    owner = take_over(tmp_path, wait_s=0.5)  # the kernel dropped the dead holder's lock: no stale lock
    try:
        with pytest.raises(RunHeld, match=f"PID {os.getpid()}"):
            RunOwner(tmp_path).acquire()
    finally:
        owner.release()
