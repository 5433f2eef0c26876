"""Run the classifier check (`python -m fgs_classifier.check`) in a sandboxed subprocess.

The API runs it on every upload and a worker on the first load of an archive. Whatever the archive does, the
check process:
- inherits no secrets: its environment is built from an allow-list (no FGS_* keys, no Redis URL, no API keys);
- is confined before it reads the archive (`confine_this_process`, its first step): address-space, CPU-time,
  file-size and core-dump limits (resource.setrlimit), and its own network namespace (unshare) so that it has
  no network; where the kernel refuses a namespace (no CAP_SYS_ADMIN and unprivileged user namespaces off) it
  runs with the host's network unless FGS_CLASSIFIER_CHECK_REQUIRE_NETWORK_ISOLATION is set, and says so;
- runs in its own session, killed as a group at the wall-clock limit;
- reports through a result file as JSON written by our code; its stdout and stderr go to a log file that is
  only ever logged on the server, never returned to a client.
This module does not import torch: the API uses it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fgs_common.settings import Settings

logger = logging.getLogger("fgs.classifier_check")

# Variables the check may inherit: none holds a secret. Everything else (FGS_*, REDIS_*, cloud credentials) stays out.
_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "LD_LIBRARY_PATH")
# Set in the check whatever the host has: no user site-packages, no bytecode written, one thread, and a second
# lock on pickle (any torch.load the loader might reach reads weights only).
_FIXED_ENV = {
    "PYTHONNOUSERSITE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
}
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_LOG_TAIL_BYTES = 4000


@dataclass(frozen=True)
class CheckOutcome:
    """What the check found: `code` is "ok" or the error code a client sees, `message` our own words."""

    code: str
    message: str

    @property
    def ok(self) -> bool:
        return self.code == "ok"


def sandbox_environment(scratch: Path) -> dict[str, str]:
    """The check's whole environment: a few harmless inherited variables, its scratch folder, `_FIXED_ENV`."""
    inherited = {name: os.environ[name] for name in _INHERITED_ENV if name in os.environ}
    return {**inherited, "HOME": str(scratch), "TMPDIR": str(scratch), **_FIXED_ENV}


def _unshare(flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.unshare(flags) == 0 else ctypes.get_errno()


def confine_this_process(memory_bytes: int, cpu_s: int, file_bytes: int) -> bool:
    """Limit this process's memory, CPU time and file writes, and leave the network; True when it has no network.

    Called by the check process itself as its first step, while it is still single-threaded (user namespaces
    cannot be entered otherwise) and before it reads anything uploaded.
    """
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # SIGXCPU at the soft limit ends the process; the hard limit (SIGKILL) catches one that ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _unshare(_CLONE_NEWNET) == 0:
        return True
    # Without CAP_SYS_ADMIN: a user namespace of our own grants it for a network namespace of our own.
    return _unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0


def _command(archive: Path, spec: Path, stats: Path | None, result: Path, settings: Settings) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "fgs_classifier.check",
        "--result",
        str(result),
        "--memory-bytes",
        str(settings.classifier_check_memory_bytes),
        "--cpu-seconds",
        str(settings.classifier_check_cpu_s),
        "--max-unpacked-bytes",
        str(settings.max_classifier_unpacked_bytes),
    ]
    if settings.classifier_check_require_network_isolation:
        command.append("--require-network-isolation")
    return command + [str(archive), str(spec)] + ([str(stats)] if stats else [])


def _log_tail(log: Path) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - _LOG_TAIL_BYTES))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_classifier_check(
    archive: Path,
    spec: Path,
    stats: Path | None,
    settings: Settings,
    scratch: Path,
    on_wait: Callable[[], None] | None = None,
) -> CheckOutcome:
    """Run the check on files in `scratch` (a private directory, the check's home) and say what it found.

    `on_wait` is called about once a second while the check runs (a worker's heartbeat).
    """
    result, log_path = scratch / "check-result.json", scratch / "check.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _command(archive, spec, stats, result, settings),
            env=sandbox_environment(scratch),
            cwd=scratch,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + settings.classifier_check_timeout_s
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                _kill_group(process)
                return CheckOutcome(
                    "classifier_check_timeout",
                    f"classifier did not load and run within {settings.classifier_check_timeout_s:g} s",
                )
            if on_wait is not None:
                on_wait()
            try:
                process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    finally:
        _kill_group(process)  # anything the check left behind in its session
    return _outcome(process.returncode, result, log_path, settings)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _outcome(returncode: int, result: Path, log: Path, settings: Settings) -> CheckOutcome:
    try:
        report = json.loads(result.read_text())
        outcome = CheckOutcome(str(report["code"]), str(report["message"]))
    except (OSError, ValueError, KeyError, TypeError):
        report, outcome = None, None
    if report is not None and not report.get("network_isolated", False):
        logger.warning("classifier check ran with the host's network: this kernel refused a network namespace")
    if outcome is not None:
        if outcome.code == "classifier_check_failed":  # the message promises the details here
            logger.warning("classifier check failed (%s); its output:\n%s", outcome.message, _log_tail(log))
        return outcome
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return CheckOutcome(
            "classifier_resource_limit",
            f"classifier check used more than {settings.classifier_check_cpu_s} s of CPU time "
            "(FGS_CLASSIFIER_CHECK_CPU_S)",
        )
    logger.warning(
        "classifier check ended with status %s without a result; its output:\n%s", returncode, _log_tail(log)
    )
    ended = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    return CheckOutcome(
        "classifier_check_failed",
        f"classifier check ended abnormally ({ended}): the archive is damaged or the classifier needs more than "
        f"the check's {settings.classifier_check_memory_bytes // 2**20} MiB of memory "
        "(FGS_CLASSIFIER_CHECK_MEMORY_BYTES)",
    )
