"""A tenant's classifier at run time runs in a confined child of the worker (issue 19, item 1).

The child gives the gradient the in-process classifier gives, is confined as the upload check is, keeps its
output out of the worker's log and dies with the worker. Through a live stack: issue 19's out-of-bounds
classifier (let past the allow-list on purpose, as it got past it before) and a classifier that allocates 3 GiB
at batch sizes the check never tries fail their own jobs with named errors, and the same worker process then
serves another tenant's job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
import torch

from fgs_classifier.registry import load_classifier
from fgs_common.exceptions import ClassifierCrashed, ClassifierTimedOut
from fgs_common.job_records import Keys
from fgs_common.settings import Settings
from fgs_common.wire import Criterion, JobState
from fgs_worker.confined_classifier import ConfinedClassifier
from fgs_worker.guidance.feedback_classifier import InProcessClassifier
from support import hostile_archives as hostile
from support.live_calls import generate, upload_classifier, wait_final
from support.stack import start_stack

ALLOW_LIST_OFF = Path(__file__).parent / "support" / "allow_list_off"


def confined(archive: Path, **settings) -> ConfinedClassifier:
    classifier = ConfinedClassifier(archive, hostile.SPEC, None, Settings(**settings))
    classifier.start()
    return classifier


def test_the_child_computes_what_the_classifier_computes_in_process_and_is_confined(tmp_path, capfd):
    archive = hostile.script_archive(tmp_path / "prints.pt", hostile.PrintsEveryForward())
    classifier = confined(archive)
    try:
        pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([1, 4, 7])
        criteria = (Criterion.loss, Criterion.entropy)
        confined_results = [classifier.criterion_and_gradient(pixels, c, labels) for c in criteria]
        scores, probabilities = classifier.score(pixels, Criterion.loss, labels)
        # Its prints went to its own output, emptied after each call: nothing in this process's stdout/stderr.
        captured = capfd.readouterr()
        assert "forged" not in captured.out + captured.err
        assert os.fstat(classifier._output_fd).st_size == 0

        in_process = InProcessClassifier(load_classifier(archive, hostile.SPEC))
        for criterion, (values, gradient) in zip(criteria, confined_results, strict=True):
            expected_values, expected_gradient = in_process.criterion_and_gradient(pixels, criterion, labels)
            torch.testing.assert_close(values, expected_values)
            torch.testing.assert_close(gradient, expected_gradient)
            assert gradient.abs().sum() > 0
        expected_scores, expected_probabilities = in_process.score(pixels, Criterion.loss, labels)
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected_scores))
        torch.testing.assert_close(torch.tensor(probabilities), torch.tensor(expected_probabilities))

        pid = classifier._process.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        address_space = next(line for line in limits.splitlines() if line.startswith("Max address space"))
        assert address_space.split()[3] == str(Settings().classifier_run_memory_bytes)
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environment if v.startswith((b"FGS_", b"REDIS"))]
        assert os.getsid(pid) == pid  # its own session: ended as a group
    finally:
        classifier.close()
    assert classifier._process is None


def allow_list_off_path() -> str:
    """PYTHONPATH with support/allow_list_off first: processes started with it have no operator allow-list."""
    return os.pathsep.join(filter(None, [str(ALLOW_LIST_OFF), os.environ.get("PYTHONPATH")]))


def test_a_crash_or_a_hang_is_a_named_failure_and_the_next_call_starts_a_new_child(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", allow_list_off_path())  # the child inherits it (the sandbox passes it on)
    crashes = confined(hostile.script_archive(tmp_path / "oob.pt", hostile.WritesOutOfBounds()))
    labels = torch.tensor([1, 2, 3])
    try:
        with pytest.raises(ClassifierCrashed, match="SIGSEGV"):
            crashes.criterion_and_gradient(torch.rand(3, 3, 32, 32), Criterion.entropy, labels)
        # the check's batch size does not crash it: the next call gets a new process, which serves
        values, _ = crashes.criterion_and_gradient(torch.rand(2, 3, 32, 32), Criterion.entropy, labels[:2])
        assert values.shape == (2,) and crashes.starts == 2
    finally:
        crashes.close()
    spins = confined(
        hostile.script_archive(tmp_path / "spins.pt", hostile.SpinsAtOtherBatches()), classifier_call_timeout_s=2
    )
    try:
        pid = spins._process.pid
        began = time.monotonic()
        with pytest.raises(ClassifierTimedOut, match="2 s"):
            spins.criterion_and_gradient(torch.rand(3, 3, 32, 32), Criterion.entropy, labels)
        assert time.monotonic() - began < 10
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        spins.close()


def test_the_child_dies_with_its_worker(tmp_path):
    archive = hostile.script_archive(tmp_path / "tiny.pt", hostile.TinyClassifier())
    worker = textwrap.dedent(
        f"""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from fgs_common.settings import Settings
        from fgs_worker.confined_classifier import ConfinedClassifier
        from support.hostile_archives import SPEC
        classifier = ConfinedClassifier(Path({str(archive)!r}), SPEC, None, Settings())
        classifier.start()
        print(classifier._process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
        """
    )
    process = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr
    child = int(process.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()


@pytest.fixture(scope="module")
def allow_list_off_stack(redis_server, tiny_model_dir, tmp_path_factory):
    """One worker whose processes (and the API's check) have the operator allow-list turned off (see
    support/allow_list_off): only the run-time confinement stands between a hostile classifier and the worker."""
    root = tmp_path_factory.mktemp("confined")
    stack = start_stack(redis_server, tiny_model_dir, root, workers=1, extra_env={"PYTHONPATH": allow_list_off_path()})
    yield stack
    stack.close()


def test_hostile_classifiers_fail_their_own_jobs_and_the_worker_serves_another_tenant(allow_list_off_stack, tmp_path):
    stack = allow_list_off_stack
    (worker,) = stack.workers
    jobs = {}
    guided = dict(num_images=3, criterion="entropy", omega=0.5, steps=2, guidance_every=1)
    with stack.client("alpha") as alpha:
        for name, module in {
            "out_of_bounds": hostile.WritesOutOfBounds(),
            "allocates_3_gib": hostile.AllocatesAtOtherBatches(3),
        }.items():
            archive = hostile.script_archive(tmp_path / f"{name}.pt", module)
            uploaded = upload_classifier(alpha, archive.read_bytes(), hostile.SPEC)
            assert uploaded.status_code == 201, uploaded.text  # the check's batch of 2 shows nothing
            jobs[name] = generate(alpha, classifier_id=uploaded.json()["classifier_id"], **guided)
        failed = {name: wait_final(alpha, job_id, timeout=300) for name, job_id in jobs.items()}
    with stack.client("beta") as beta:
        archive = hostile.script_archive(tmp_path / "tiny.pt", hostile.TinyClassifier())
        uploaded = upload_classifier(beta, archive.read_bytes(), hostile.SPEC)
        assert uploaded.status_code == 201, uploaded.text
        served = wait_final(beta, generate(beta, classifier_id=uploaded.json()["classifier_id"], **guided), timeout=300)
    crashed, out_of_memory = failed["out_of_bounds"], failed["allocates_3_gib"]
    assert crashed.state is JobState.failed and crashed.error.code == "classifier_crashed", crashed
    assert "SIGSEGV" in crashed.error.message
    assert out_of_memory.state is JobState.failed, out_of_memory
    assert out_of_memory.error.code == "classifier_resource_limit", out_of_memory
    assert f"{Settings().classifier_run_memory_bytes // 2**20} MiB" in out_of_memory.error.message
    assert served.state is JobState.finished and len(served.results) == 3, served
    assert all(result.criterion_value is not None for result in served.results)
    assert worker.poll() is None  # the stack's one worker process, alive: nothing restarts it in this stack
    records = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    ran_on = {records.hget(Keys(stack.prefix).job(job.job_id), "worker") for job in (crashed, out_of_memory, served)}
    assert len(ran_on) == 1
