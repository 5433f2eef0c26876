"""Atomic file writes: write beside the target under a temporary name, fsync, rename into place.

A reader (another process, a probe, a resumed client) sees either no file or the whole file, never half of
one. Every temporary name is `.{final name}.tmp-{pid}-{random}` in the target's own folder (a rename never
crosses file systems), so whatever an interrupted write leaves behind is recognised by `is_temporary_name`
and can be swept up (the client's resume does: `fgs_client.dataset_writer.remove_temporary_files`).
The folder itself is not fsynced after the rename: what we guarantee is "never half a file", not that the
last write survives a power cut.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY_MARK = ".tmp-"


def temporary_name(final_name: str) -> str:
    """The temporary name of a write that will end as `final_name` (pid and random: threads never collide)."""
    return f".{final_name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def is_temporary_name(name: str) -> bool:
    """True for a name `temporary_name` made (or that an older fgs made: `.name.tmp-<pid>`)."""
    return name.startswith(".") and TEMPORARY_MARK in name


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to fill (by any means, e.g. `shutil.copy2`); on a clean
    exit it is fsynced and renamed to `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(temporary_name(path.name))
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_writer(path: Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """An open file (`open(..., mode, **open_kwargs)`) that appears under `path` whole once the block ends."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_writer writes a new file; mode {mode!r} does not")
    with atomic_path(path) as temporary:
        with open(temporary, mode, **open_kwargs) as handle:
            yield handle


def write_atomic(path: Path, data: bytes | str, encoding: str = "utf-8") -> None:
    """Write `data` (bytes, or text in `encoding`) to `path` atomically."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_writer(path, "wb") as handle:
        handle.write(payload)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` for the caller to fill; on a clean exit its files are fsynced and the
    folder is renamed to `path` whole. If `path` appeared meanwhile (another process wrote the same content),
    that copy is kept and ours is dropped: callers use this for content-addressed or reproducible folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(temporary_name(path.name))
    temporary.mkdir()
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        try:
            os.rename(temporary, path)
        except OSError:
            if not path.exists():  # not a lost race with an identical copy: a real failure
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
