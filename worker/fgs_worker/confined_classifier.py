"""A tenant's classifier at run time: in a confined child process of the worker, one per loaded classifier.

The worker never runs tenant code in its own process (issue 19: a classifier that wrote out of bounds at a batch
size the upload check never tried corrupted the worker's heap). `ConfinedClassifier` is what the sampler gets
(a fgs_worker.guidance.feedback_classifier.FeedbackClassifier): `criterion_and_gradient(images)` returns C and
dC/dimages, computed by the child (fgs_worker.classifier_child: forward, criterion, backward), and the sampler
carries the gradient on to z_t in the worker. Per call:

    worker                                          child (confined: rlimits, no network, no secrets)
    images -> shared memory (memfd) ──── {"op", "shape", "labels"} on a pipe ───▶ forward, C, backward
    C, dC/dimages <- shared memory  ◀──────────────── {"ok": true} ─────────────── results -> shared memory

The child is confined as the upload check is (fgs_common.classifier_sandbox: allow-listed environment, address
space FGS_CLASSIFIER_RUN_MEMORY_BYTES, CPU time, file size, own network namespace where the kernel allows, own
session), dies with the worker (PR_SET_PDEATHSIG), reads the archive and the statistics only through the open
files it inherits, and writes its stdout and stderr into a memfd the worker bounds and empties after each call.

A crash (SIGSEGV), a call past FGS_CLASSIFIER_CALL_TIMEOUT_S or an allocation past the memory limit raises a
named ClassifierRunFailed (the job fails; fgs_common.exceptions); the child is ended, and started again on the
next call, so the worker and its other jobs go on. An error the classifier raises (ClassifierRaised) is retried as
any torch error is. The GPU design and the cost per feedback step: docs/CONFINED_CLASSIFIER.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fgs_common.classifier_sandbox import sandbox_environment
from fgs_common.exceptions import (
    ClassifierCrashed,
    ClassifierOutOfMemory,
    ClassifierRaised,
    ClassifierTimedOut,
    InvalidClassifier,
)
from fgs_common.settings import Settings
from fgs_common.wire import ClassifierSpec, Criterion

log = logging.getLogger("fgs.worker.classifier")

# CPU time the child may spend over its life (RLIMIT_CPU: the backstop behind the per-call deadline). A child past
# half of it is started afresh between calls, so a busy classifier never meets the limit mid-call.
CHILD_CPU_S = 3600
_REPLY_MAX_BYTES = 64 * 1024
_OUTPUT_TAIL_BYTES = 2000


class ConfinedClassifier:
    """One tenant classifier served by its confined child; `close()` ends the child."""

    def __init__(
        self,
        archive: Path,
        spec: ClassifierSpec,
        stats: Path | None,
        settings: Settings,
        on_wait: Callable[[], None] | None = None,
    ):
        self.spec = spec
        self.has_hardness_stats = stats is not None
        self.settings = settings
        self.on_wait = on_wait
        self.starts = 0  # how many children this classifier has had (a restart after a failure adds one)
        # The archive and the statistics as open files: the child reads those, whatever happens to the store.
        self._archive_fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
        self._stats_fd = os.open(stats, os.O_RDONLY | os.O_CLOEXEC) if stats is not None else None
        self._shared_fd = os.memfd_create("fgs-classifier-shared", os.MFD_CLOEXEC)
        self._shared: mmap.mmap | None = None
        self._output_fd = os.memfd_create("fgs-classifier-output", os.MFD_CLOEXEC)
        fcntl.fcntl(self._output_fd, fcntl.F_SETFL, os.O_APPEND)  # the child appends after each truncation
        self._process: subprocess.Popen | None = None
        self._requests = self._replies = None

    # ---- the child ----
    def start(self) -> None:
        """Start the child and wait until it has loaded the classifier (FGS_CLASSIFIER_CHECK_TIMEOUT_S)."""
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        inherited = [request_read, reply_write, self._shared_fd, self._archive_fd, self._output_fd]
        command = [
            sys.executable,
            "-m",
            "fgs_worker.classifier_child",
            f"--parent-pid={os.getpid()}",
            f"--control-in={request_read}",
            f"--control-out={reply_write}",
            f"--shared={self._shared_fd}",
            f"--archive-fd={self._archive_fd}",
            f"--memory-bytes={self.settings.classifier_run_memory_bytes}",
            f"--cpu-seconds={CHILD_CPU_S}",
            f"--max-unpacked-bytes={self.settings.max_classifier_unpacked_bytes}",
        ]
        if self._stats_fd is not None:
            command.append(f"--stats-fd={self._stats_fd}")
            inherited.append(self._stats_fd)
        if self.settings.classifier_check_require_network_isolation:
            command.append("--require-network-isolation")
        try:
            self._process = subprocess.Popen(
                command,
                env=sandbox_environment(Path("/nonexistent")),  # no home, no temp folder: it writes no files
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=self._output_fd,
                stderr=self._output_fd,
                pass_fds=inherited,
                start_new_session=True,  # killed as a group
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = os.fdopen(request_write, "w", encoding="utf-8")
        self._replies = reply_read
        self.starts += 1
        try:
            reply = self._exchange(
                {"spec": self.spec.model_dump(mode="json")}, self.settings.classifier_check_timeout_s
            )
        except ClassifierTimedOut:
            raise ClassifierTimedOut(
                f"classifier did not load within {self.settings.classifier_check_timeout_s:g} s "
                "(FGS_CLASSIFIER_CHECK_TIMEOUT_S)"
            ) from None
        if not reply.get("ok"):
            self.stop()
            raise InvalidClassifier(f"classifier could not be loaded at run time: {reply.get('message', '')}")
        if not reply.get("network_isolated"):
            log.warning("classifier process runs with the host's network: this kernel refused a network namespace")

    def stop(self) -> None:
        """End the child (its whole session); the next call starts a new one."""
        process, self._process = self._process, None
        if self._requests is not None:
            try:
                self._requests.close()
            except OSError:
                pass
            os.close(self._replies)
            self._requests = self._replies = None
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()

    def close(self) -> None:
        """End the child and let go of the files (the registry calls it on eviction)."""
        self.stop()
        self._shared = None
        for fd in (self._archive_fd, self._stats_fd, self._shared_fd, self._output_fd):
            if fd is not None:
                os.close(fd)
        self._archive_fd = self._stats_fd = self._shared_fd = self._output_fd = None

    def _cpu_seconds(self) -> float:
        """CPU time the child has used (its /proc stat, utime + stime)."""
        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _ensure_started(self) -> None:
        if self._process is not None and self._cpu_seconds() > CHILD_CPU_S / 2:
            self.stop()
        if self._process is None:
            self.start()

    # ---- one call ----
    def _floats(self, count: int) -> torch.Tensor:
        """`count` float32 of shared memory, grown (and mapped again) when a call needs more."""
        needed = 4 * count
        if self._shared is None or len(self._shared) < needed:
            # The old map is dropped, not closed: tensors of an earlier call may still view it.
            size = max(needed, os.fstat(self._shared_fd).st_size)
            os.ftruncate(self._shared_fd, size)
            self._shared = mmap.mmap(self._shared_fd, size)
        return torch.frombuffer(self._shared, dtype=torch.float32, count=count)

    def _exchange(self, request: dict, timeout_s: float) -> dict:
        """Send one request, wait for its reply; a dead or silent child is a named failure (and is ended)."""
        try:
            self._requests.write(json.dumps(request) + "\n")
            self._requests.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: its end is read below
        deadline = time.monotonic() + timeout_s
        received = b""
        while not received.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail_output("ran past its deadline")
                self.stop()
                raise ClassifierTimedOut(
                    f"classifier did not answer within {timeout_s:g} s (FGS_CLASSIFIER_CALL_TIMEOUT_S); its process "
                    "was ended"
                )
            ready, _, _ = select.select([self._replies], [], [], min(left, 1.0))
            if self.on_wait is not None:
                self.on_wait()
            if not ready:
                continue
            chunk = os.read(self._replies, 4096)
            if not chunk or len(received) + len(chunk) > _REPLY_MAX_BYTES:
                self._crashed()
            received += chunk
        try:
            return json.loads(received)
        except ValueError:
            self._crashed()

    def _crashed(self):
        process = self._process
        self._fail_output("ended")
        self.stop()
        code = process.returncode if process is not None else None
        ended = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        raise ClassifierCrashed(f"classifier process ended during a call ({ended}); it is started again for the next")

    def _fail_output(self, what: str) -> None:
        """Log the end of what the child printed, as one escaped string (it cannot forge log lines)."""
        size = os.fstat(self._output_fd).st_size
        tail = os.pread(self._output_fd, _OUTPUT_TAIL_BYTES, max(0, size - _OUTPUT_TAIL_BYTES))
        log.warning("classifier process %s; the end of its output: %r", what, tail.decode("utf-8", "replace"))

    def _call(self, op: str, pixels: torch.Tensor, criterion: Criterion, labels: torch.Tensor) -> torch.Tensor:
        """Run `op` on pixels [B, C, H, W]; returns the shared floats (images region, then C, then softmax)."""
        self._ensure_started()
        batch = pixels.shape[0]
        count = pixels.numel()
        floats = self._floats(count + batch + batch * self.spec.num_classes)
        floats[:count] = pixels.detach().reshape(-1).float().cpu()
        request = {
            "op": op,
            "shape": list(pixels.shape),
            "criterion": criterion.value,
            "labels": [int(label) for label in labels.tolist()],
        }
        reply = self._exchange(request, self.settings.classifier_call_timeout_s)
        if os.fstat(self._output_fd).st_size:
            os.ftruncate(self._output_fd, 0)  # printed output is bounded per call and never kept
        if reply.get("ok"):
            return floats
        message = str(reply.get("message", ""))[:400]
        if reply.get("error") == "memory":
            self.stop()  # a process that met its memory limit is not trusted with the next call
            raise ClassifierOutOfMemory(
                f"classifier needs {message} of memory (FGS_CLASSIFIER_RUN_MEMORY_BYTES) at a batch of {batch}"
            )
        raise ClassifierRaised(f"classifier failed at a batch of {batch}: {message}")

    def criterion_and_gradient(self, pixels, criterion, labels):
        """(C [B], dC/dpixels [B, C, H, W]) from the child, on the pixels' device and dtype."""
        floats = self._call("gradient", pixels, criterion, labels)
        count, batch = pixels.numel(), pixels.shape[0]
        gradient = floats[:count].view(pixels.shape).to(device=pixels.device, dtype=pixels.dtype, copy=True)
        values = floats[count : count + batch].to(device=pixels.device, dtype=pixels.dtype, copy=True)
        return values, gradient

    def score(self, pixels, criterion, labels):
        floats = self._call("score", pixels, criterion, labels)
        count, batch = pixels.numel(), pixels.shape[0]
        values = None if criterion is Criterion.none else floats[count : count + batch].tolist()
        probabilities = floats[count + batch :].view(batch, self.spec.num_classes).tolist()
        return values, probabilities
