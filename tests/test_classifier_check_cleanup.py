"""Issue 19, finding 6: a SIGKILL of the API or of a worker in the middle of a classifier check leaves no check
process running (PR_SET_PDEATHSIG, fgs_common.classifier_sandbox.die_with_parent) and no scratch once a new
process of the same kind has started (sweep_check_scratch). Real processes, real signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from fgs_common.artifact_store import ArtifactStore
from fgs_common.loopback import free_port
from fgs_lab.live_stack import spawn_api, wait_until_serving
from support import hostile_archives as hostile
from support.live_calls import generate, upload_classifier
from support.stack import start_stack

# The check imports torch and loads the archive in about 1.4 s of CPU (common/fgs_common/settings.py);
# past this it spins.
SPUN_CPU_S = 3.0


def check_processes_of(parent: int) -> list[int]:
    """Live (not zombie) `python -m fgs_classifier.check` processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"fgs_classifier.check" in cmdline and int(stat[1]) == parent and stat[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; whoever adopted it reaps it


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_for_check(parent: int, scratch_root: Path, timeout: float = 120) -> int:
    """The pid of `parent`'s check once it has spent SPUN_CPU_S of CPU: long past its first steps (a check whose
    parent died before it asked for PR_SET_PDEATHSIG exits at its getppid() comparison), spinning in forward."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = check_processes_of(parent)
        if (
            children
            and list(scratch_root.glob(".classifier-check-*/check.log"))
            and (cpu_seconds(children[0]) >= SPUN_CPU_S)
        ):
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"no classifier check of {parent} started within {timeout} s")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def stack(redis_server, tiny_model_dir, tmp_path):
    """An API alone (the test kills it), its check allowed 30 s of CPU: the spinning check runs until killed."""
    stack = start_stack(
        redis_server, tiny_model_dir, tmp_path / "stack", workers=0, extra_env={"FGS_CLASSIFIER_CHECK_CPU_S": "30"}
    )
    yield stack
    stack.close()


def test_a_killed_api_leaves_no_check_running_and_its_restart_sweeps_the_scratch(stack, tmp_path):
    spinning = hostile.script_archive(tmp_path / "spins.pt", hostile.SpinsForever()).read_bytes()

    def upload() -> None:
        with stack.client("alpha") as client, pytest.raises(httpx.TransportError):  # its API is killed
            upload_classifier(client, spinning, hostile.SPEC)

    uploader = threading.Thread(target=upload)
    uploader.start()
    check = wait_for_check(stack.api.pid, stack.data_dir)
    stack.api.send_signal(signal.SIGKILL)
    stack.api.wait()
    uploader.join(timeout=60)
    wait_until(lambda: not alive(check), 10, f"check {check} outlived its killed API")
    assert [p.name for p in stack.data_dir.glob(".classifier-check-*")]  # left behind: nobody swept it yet

    port = free_port()
    stack.api = spawn_api(stack.env, port, stack.log_dir / "api-restarted.log")
    wait_until_serving(f"http://127.0.0.1:{port}", [stack.api], 120)
    assert list(stack.data_dir.glob(".classifier-check-*")) == []


def test_a_killed_worker_leaves_no_check_running_and_its_restart_sweeps_the_scratch(stack, tmp_path):
    worker_tmp = tmp_path / "worker-tmp"  # the worker's system temp folder, where its checks' scratch goes
    worker_tmp.mkdir()
    stack.env["TMPDIR"] = str(worker_tmp)
    spinning = hostile.script_archive(tmp_path / "spins.pt", hostile.SpinsForever()).read_bytes()
    classifier_id = ArtifactStore(stack.data_dir).put_classifier(  # as if stored while the API's check was off
        "alpha", spinning, "archive.pt", hostile.SPEC.model_dump_json().encode(), None
    )
    worker = stack.spawn_worker()
    stack.wait_ready(workers=1)
    with stack.client("alpha") as client:
        job_id = generate(client, criterion="entropy", omega=0.5, classifier_id=classifier_id, steps=2)
        check = wait_for_check(worker.pid, worker_tmp)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        wait_until(lambda: not alive(check), 10, f"check {check} outlived its killed worker")
        assert [p.name for p in worker_tmp.glob(".classifier-check-*")]

        stack.workers.remove(worker)
        restarted = stack.spawn_worker()
        wait_until(lambda: not list(worker_tmp.glob(".classifier-check-*")), 120, "the new worker swept nothing")
        assert restarted.poll() is None and not check_processes_of(worker.pid)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 202  # not run again by the new worker
    assert os.path.isdir(worker_tmp)
