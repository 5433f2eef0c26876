"""One tenant cannot stall the pool (issue 10, defect 3), and `fgs up` supervises (defect 4's supervisor half).

A classifier that passes the upload check (batch of 2) but loops forever inside TorchScript on a batch of one
hangs its worker in C++. The watchdog ends that worker from its own thread, `fgs up` restarts it, the job is
retried FGS_JOB_RETRIES times and then `failed` (step_timeout), while another tenant's jobs finish; a cancel of
such a stuck job takes effect the same way. On Ctrl-C, `fgs up` leaves no child running, a SIGSTOPped one
included. Real processes, real signals, a real TorchScript archive; `fgs up` on the session's redis-server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from fgs_common.loopback import free_port
from fgs_common.wire import ClassifierOutput, ClassifierSpec
from support.live_calls import JobState, generate, get_job, upload_classifier, wait_final, wait_for
from support.stack import TENANT_KEYS

pytestmark = pytest.mark.stack  # starts `fgs up`
STEP_DEADLINE_S = 4
# Past the step deadline plus a heartbeat period (1 s), with room for a loaded machine: a stuck step is the
# watchdog's to end before RQ's abandon sweep takes the job (at 5 s, a tie, the sweep won on a loaded machine).
ABANDONED_AFTER_S = 8
SETUP_DEADLINE_S = 60  # the first load of a classifier runs its sandboxed check in the worker
RETRIES = 1
# Each attempt: the step deadline (set-up has its own, not reached here), the abandon sweep
# (FGS_ABANDONED_AFTER_S), the retry backoff, and 60 s for the worker's restart and the classifier's load and
# sandboxed check on 2 shared cores.
FAILED_WITHIN_S = (RETRIES + 1) * (STEP_DEADLINE_S + ABANDONED_AFTER_S + 1 + 60)


class HangsOnBatchOfOne(torch.nn.Module):
    """Logits from the mean colour; loops forever when given a single image."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spins = 0
        while x.shape[0] == 1:
            spins += 1
        return x.mean(dim=(2, 3)) @ self.weight


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def workers_alive(base: str) -> int:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).json().get("workers") or 0
    except (httpx.HTTPError, ValueError):
        return 0


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_a_classifier_that_hangs_on_a_batch_of_one_fails_its_job_while_others_finish(
    redis_server, tiny_model_dir, tmp_path
):
    from fgs_service.auth import hash_key

    keys_file = tmp_path / "keys.json"
    tenants = [{"name": n, "key_sha256": [hash_key(k)]} for n, k in TENANT_KEYS.items()]
    keys_file.write_text(json.dumps({"tenants": tenants}))
    archive = tmp_path / "hang.pt"
    torch.jit.script(HangsOnBatchOfOne()).save(str(archive))
    spec = ClassifierSpec(num_classes=10, input_size=32, output=ClassifierOutput.logits)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGS_")}
    env.update(
        FGS_REDIS_URL=redis_server,
        FGS_REDIS_PREFIX=f"fgs-test-watchdog-{uuid.uuid4().hex[:8]}",
        FGS_API_KEYS_FILE=str(keys_file),
        FGS_DATA_DIR=str(tmp_path / "data"),
        FGS_DEVICE="cpu",
        FGS_HEARTBEAT_S="1",
        FGS_JOB_RETRIES=str(RETRIES),
        FGS_RETRY_BACKOFF_S="[1]",
        FGS_ABANDONED_AFTER_S=str(ABANDONED_AFTER_S),
        FGS_STEP_DEADLINE_BASE_S=str(STEP_DEADLINE_S),
        FGS_STEP_DEADLINE_S_PER_MEGAPIXEL="0",
        FGS_JOB_SETUP_DEADLINE_S=str(SETUP_DEADLINE_S),
        FGS_CANCEL_GRACE_S="2",
        FGS_RESTART_BACKOFF_S="[0.5, 1]",
        FGS_STOP_GRACE_S="3",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    command = [
        sys.executable,
        "-m",
        "fgs_service.cli",
        "up",
        "--port",
        str(port),
        "--workers",
        "2",
        "--model",
        str(tiny_model_dir),
    ]
    up = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True).start()
    try:
        wait_until(lambda: workers_alive(base) == 2, 180, "fgs up with 2 live workers")
        api_pid = next(pid for pid in children_of(up.pid) if "\0api\0" in Path(f"/proc/{pid}/cmdline").read_text())
        alpha = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TENANT_KEYS['alpha']}"}, timeout=60)
        beta = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TENANT_KEYS['beta']}"}, timeout=60)
        uploaded = upload_classifier(alpha, archive.read_bytes(), spec)
        assert uploaded.status_code == 201, uploaded.text  # the upload check's batch of 2 passes
        hanging = {
            "criterion": "loss",
            "omega": 0.05,
            "classifier_id": uploaded.json()["classifier_id"],
            "num_images": 1,
            "steps": 2,
            "guidance_every": 1,
        }

        began = time.time()
        stuck = generate(alpha, **hanging)
        others = [generate(beta, seed=s) for s in range(3)]
        for job_id in others:
            assert wait_final(beta, job_id, timeout=FAILED_WITHIN_S).state is JobState.finished
        failed = wait_final(alpha, stuck, timeout=FAILED_WITHIN_S)
        took = time.time() - began
        assert failed.state is JobState.failed, failed
        assert failed.error.code == "step_timeout" and "deadline" in failed.error.message, failed.error
        assert took < FAILED_WITHIN_S

        # cancel of a stuck job: the watchdog ends it too, within the cancel grace
        stuck_again = generate(alpha, **hanging)
        wait_for(alpha, stuck_again, lambda j: j.state is JobState.running, timeout=120)
        assert alpha.delete(f"/v1/jobs/{stuck_again}").status_code == 202
        canceled = wait_final(alpha, stuck_again, timeout=30)
        assert canceled.state is JobState.canceled, canceled

        # the supervisor restarted every worker the watchdog ended, and never the API
        wait_until(lambda: workers_alive(base) == 2, 120, "both workers back")
        assert alive(api_pid) and api_pid in children_of(up.pid)
        assert wait_final(beta, generate(beta), timeout=120).state is JobState.finished
        assert get_job(alpha, stuck).state is JobState.failed  # a poison job stays failed

        # a worker killed outright is restarted as well
        worker_pids = [pid for pid in children_of(up.pid) if pid != api_pid]
        os.kill(worker_pids[0], signal.SIGKILL)
        wait_until(
            lambda: len([p for p in children_of(up.pid) if p != api_pid and alive(p)]) == 2
            and worker_pids[0] not in children_of(up.pid),
            60,
            "the killed worker restarted",
        )

        # Ctrl-C with a stopped worker: fgs up SIGKILLs it after its grace and leaves nothing behind
        children = children_of(up.pid)
        os.kill(worker_pids[1], signal.SIGSTOP)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, "".join(lines[-30:])
        assert not [pid for pid in children if alive(pid)], "children left running after fgs up stopped"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
