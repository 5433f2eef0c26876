"""Reading multipart uploads with a size limit: into memory (small parts) or streamed to a file (large ones)."""

from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile

from fgs_service.errors import ApiError

_CHUNK = 1 << 20


def _chunks_within(file: UploadFile, limit: int, what: str, setting: str):
    """The upload's chunks, 413 as soon as their total passes `limit`, 400 when there are none."""
    total = 0
    while chunk := file.file.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "upload_too_large", f"{what} is larger than the limit of {limit} bytes{setting}")
        yield chunk
    if total == 0:
        raise ApiError(400, "empty_upload", f"{what} is empty")


def read_limited(file: UploadFile, limit: int, what: str) -> bytes:
    """All bytes of `file` (a small part), or 413 as soon as it passes `limit`."""
    return b"".join(_chunks_within(file, limit, what, ""))


def copy_limited(file: UploadFile, destination: Path, limit: int, what: str, setting: str) -> int:
    """Copy `file` to `destination` chunk by chunk (never whole in memory); its size, or 413 past `limit`."""
    total = 0
    with open(destination, "wb") as out:
        for chunk in _chunks_within(file, limit, what, f" ({setting})"):
            out.write(chunk)
            total += len(chunk)
    return total
