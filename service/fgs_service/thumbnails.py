"""Thumbnails of stored images for the page's grids: made once per (image, size), cached beside the images.

    {data_dir}/tenants/{tenant}/thumbnails/{size}/{image_id}.webp

Content ids never change meaning, so a cached thumbnail is valid forever; it is written atomically like
every other artifact, with `fgs_common.atomic_files` (two requests racing make the same bytes).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from fgs_common.artifact_store import ArtifactStore
from fgs_common.atomic_files import write_atomic

THUMBNAIL_MEDIA_TYPE = "image/webp"


class ThumbnailCache:
    def __init__(self, store: ArtifactStore):
        self.store = store

    def path(self, tenant: str, image_id: str, size: int) -> Path | None:
        """The thumbnail's file (made now if missing), or None when the tenant has no such image."""
        source = self.store.image_path(tenant, image_id)
        if source is None:
            return None
        target = self.store.tenant_dir(tenant) / "thumbnails" / str(size) / f"{image_id}.webp"
        if not target.exists():
            write_atomic(target, _thumbnail_bytes(source, size))
        return target


def _thumbnail_bytes(source: Path, size: int) -> bytes:
    with Image.open(source) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)  # keeps the aspect ratio, never enlarges
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=82, method=4)
    return buffer.getvalue()
