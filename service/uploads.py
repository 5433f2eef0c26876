"""Reading multipart uploads with a size limit: into memory (small parts) or streamed to a file (large ones)."""

from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile

from fgs_service.errors import ApiError

_CHUNK = 1 << 20


def read_limited(file: UploadFile, limit: int, what: str) -> bytes:
    """All bytes of `file`, or 413 as soon as it passes `limit`."""
    parts: list[bytes] = []
    total = 0
    while chunk := file.file.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "upload_too_large", f"{what} is larger than the limit of {limit} bytes")
        parts.append(chunk)
    if total == 0:
        raise ApiError(400, "empty_upload", f"{what} is empty")
    return b"".join(parts)


def copy_limited(file: UploadFile, destination: Path, limit: int, what: str, setting: str) -> int:
    """Copy `file` to `destination` chunk by chunk (never whole in memory); its size, or 413 past `limit`."""
    total = 0
    with open(destination, "wb") as out:
        while chunk := file.file.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "upload_too_large", f"{what} is larger than the limit of {limit} bytes ({setting})")
            out.write(chunk)
    if total == 0:
        raise ApiError(400, "empty_upload", f"{what} is empty")
    return total
