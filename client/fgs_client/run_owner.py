"""One run, one owner: `balance` holds an exclusive lock on its `--out` while it runs, and `fgs-client cancel`
takes the run over from it rather than racing it.

The lock is `fcntl.flock` on a file in `--out` that records the owner's PID and host; the kernel drops it when
the owner exits, however it exits, so a killed client leaves no stale lock. `cancel` asks a live owner to stop
through a stop file the owner looks at between polls (no signal: the owner may run on another host sharing the
folder), waits for the lock, and refuses, naming the owner, when it does not come.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from fgs_client.balance_state import STATE_NAME
from fgs_common.exceptions import UserInputError

# Beside the state file and named after it: the run's own files are `.fgs-balance.sqlite*` (the SQLite WAL too)
LOCK_NAME = STATE_NAME + ".lock"
STOP_NAME = STATE_NAME + ".stop"
# A balance looks at the stop file at every poll (0.5 s by default) and between chunks; a chunk's submission
# (up to 500 jobs and their image uploads) is the longest stretch without a look.
STOP_WAIT_S = 60.0


class RunHeld(UserInputError):
    """Another process holds the run in this folder."""

    def __init__(self, out: Path, owner: dict, waited_s: float | None = None):
        self.owner = owner
        who = f"fgs-client PID {owner.get('pid', '?')} on {owner.get('host', '?')} (since {owner.get('started', '?')})"
        if waited_s is None:
            message = (
                f"{out} is held by another balance run: {who}. Wait for it to end, or stop it with "
                f"fgs-client cancel --out {out}"
            )
        else:
            message = (
                f"{out} is held by {who}, which did not stop within {waited_s:.0f} s of being asked: stop that "
                f"process (kill {owner.get('pid', '?')}), then run fgs-client cancel --out {out} again"
            )
        super().__init__(message)


class RunStopped(Exception):
    """`fgs-client cancel` asked this run to stop: it takes over the run and cancels its jobs."""


class RunOwner:
    """The lock on a run's folder, held from `acquire` until `release` (or the process ends)."""

    def __init__(self, out: Path):
        self.out = out
        self._fd: int | None = None

    def acquire(self) -> RunOwner:
        """Take the lock without waiting; RunHeld naming the owner when another process has it."""
        fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunHeld(self.out, read_owner(self.out)) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat("T", "seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunOwner:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def clear_stop(self) -> None:
        """Forget a stop asked of an earlier owner (one that ended before it looked)."""
        (self.out / STOP_NAME).unlink(missing_ok=True)

    def check_stop(self) -> None:
        """RunStopped when `fgs-client cancel` asked this run to stop."""
        if (self.out / STOP_NAME).exists():
            raise RunStopped(
                f"stopped: fgs-client cancel --out {self.out} took this run over and cancels its jobs; rerun the "
                "same balance command to resume them"
            )


def read_owner(out: Path) -> dict:
    """What the lock file says of its holder (PID, host, start), {} when it says nothing readable."""
    try:
        return json.loads((out / LOCK_NAME).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def take_over(out: Path, wait_s: float = STOP_WAIT_S) -> RunOwner:
    """The run's lock for `cancel`: at once when no one holds it, else after asking the owner to stop and waiting
    up to `wait_s` for it to let go; RunHeld naming the owner when it does not."""
    owner = RunOwner(out)
    try:
        return owner.acquire()
    except RunHeld:
        pass
    (out / STOP_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            owner.acquire()
        except RunHeld as held:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            owner.clear_stop()  # no stop left behind for a later run
            raise RunHeld(out, held.owner, waited_s=wait_s) from None
        owner.clear_stop()
        return owner
