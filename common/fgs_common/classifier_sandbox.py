"""Run the classifier check (`python -m fgs_classifier.check`) in a sandboxed subprocess.

The API runs it on every upload and a worker on the first load of an archive. Whatever the archive does, the
check process:
- inherits no secrets: its environment is built from an allow-list (no FGS_* keys, no Redis URL, no API keys);
- is confined before it reads the archive (`confine_this_process`, its first step): address-space, CPU-time,
  file-size and core-dump limits (resource.setrlimit), and its own network namespace (unshare) so that it has
  no network; where the kernel refuses a namespace (no CAP_SYS_ADMIN and unprivileged user namespaces off) it
  runs with the host's network unless FGS_CLASSIFIER_CHECK_REQUIRE_NETWORK_ISOLATION is set, and says so;
- runs in its own session, killed as a group at the wall-clock limit, and dies with its parent: its first step
  asks the kernel for SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG), so a SIGKILL of the API
  or of a worker mid-check leaves no check running;
- reports through a result file as JSON written by our code; its stdout and stderr go to a log file in its
  scratch folder (bounded, as every file it writes, by its file-size limit) that is only ever logged on the
  server, never returned to a client nor interleaved with the server's own log.
Its scratch folder (`check_scratch`) is named after the process that made it (host, pid, start time), so that a
process finding the folder of a dead owner removes it: the API at start-up, every check before it starts.
This module does not import torch: the API uses it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 4000
SCRATCH_PREFIX = ".classifier-check-"
# Scratch of another host (a shared data volume) is removed only once older than this: its owner cannot be asked
# whether it lives, and no check outlives FGS_CLASSIFIER_CHECK_TIMEOUT_S plus its upload by anything near a day.
_FOREIGN_SCRATCH_AGE_S = 24 * 3600


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


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names one
    process for the life of the machine (a pid alone is reused, and is 1 in every container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_name(pid: int) -> str:
    return f"{socket.gethostname()}-{pid}-{_start_time(pid)}"


def _owner_alive(name: str) -> bool:
    """Whether the scratch folder `name` belongs to a live process (another host's: assumed alive)."""
    parts = name[len(SCRATCH_PREFIX) :].rsplit("-", 3)  # host (may hold dashes), pid, start time, random
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return True
    return _start_time(int(parts[1])) == parts[2]


def sweep_check_scratch(root: Path) -> list[str]:
    """Remove the check scratch folders in `root` whose owner has died (and another host's after a day); their
    names. The API runs it at start-up; every check (`check_scratch`) before it starts."""
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        try:
            stale = not _owner_alive(path.name) or (time.time() - path.stat().st_mtime > _FOREIGN_SCRATCH_AGE_S)
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.info("removed the classifier check scratch of processes that ended: %s", ", ".join(removed))
    return removed


@contextmanager
def check_scratch(root: Path) -> Iterator[Path]:
    """A private folder in `root` for one check (the check's home), removed afterwards; dead owners' are swept."""
    root.mkdir(parents=True, exist_ok=True)
    sweep_check_scratch(root)
    path = root / f"{SCRATCH_PREFIX}{_owner_name(os.getpid())}-{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def die_with_parent(parent_pid: int) -> None:
    """Ask for SIGKILL when the thread that started this process ends; exit at once if it already has.

    The check's first step. The parent's thread waits for the check (run_classifier_check), so it ends only when
    its process dies. The getppid() comparison closes the window between fork and this call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


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
        "--parent-pid",
        str(os.getpid()),
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
    """Run the check on files in `scratch` (a `check_scratch` folder, the check's home) and say what it found.

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
