"""Reading multipart uploads with a size limit."""

from __future__ import annotations

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
