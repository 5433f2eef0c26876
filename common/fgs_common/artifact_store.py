"""The artifact store: a directory (FGS_DATA_DIR, a shared volume when workers run elsewhere), one folder per tenant.

    {data_dir}/tenants/{tenant}/images/{sha256}.{png|jpeg|webp}   uploaded conditioning images and generated PNGs
    {data_dir}/tenants/{tenant}/uploads/{sha256}.json   an uploaded image's record (name, date, size)
    {data_dir}/tenants/{tenant}/classifiers/{classifier_id}/archive.{pt|pt2}, spec.json, meta.json,
        [hardness.safetensors]

`meta.json` holds what is not content (the name it was uploaded with, when): the id stays a digest of the content.

Ids are sha256 digests of the content, so the same upload twice is one object. Every write goes through
`fgs_common.atomic_files` (temporary name in the same directory, fsync, rename): a reader never sees half a
file, nor half a classifier folder. Shared by the API and the workers; imports neither torch nor FastAPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from fgs_common.atomic_files import atomic_directory, temporary_name, write_atomic

_ID = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
IMAGE_EXTENSIONS = ("png", "jpeg", "webp")
ARCHIVE_NAMES = ("archive.pt", "archive.pt2")
CLASSIFIER_META = "meta.json"
_HASH_CHUNK = 1 << 20


def is_object_id(value: str) -> bool:
    return bool(_ID.match(value))


def _read_json(path: Path) -> dict | None:
    """A record file's JSON; None when it is gone (deleted by a concurrent request since it was listed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Per-tenant files under one root."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def writable(self) -> str | None:
        """None when a small file can be written, synced and removed under the root; else why not."""
        probe = self.root / f".probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)  # a whole block: an empty file can be created on a full disk
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            return f"{type(error).__name__}: {error.strerror or error}"
        finally:
            probe.unlink(missing_ok=True)
        return None

    def tenant_dir(self, tenant: str) -> Path:
        if not _TENANT.match(tenant) or tenant in (".", ".."):  # "..": the folder above, not a tenant's own
            raise ValueError(f"invalid tenant name {tenant!r}")
        return self.root / "tenants" / tenant

    # ---- images ----
    def put_image(self, tenant: str, data: bytes, fmt: str) -> str:
        """Store image bytes (format 'png'|'jpeg'|'webp'); returns the content id."""
        if fmt not in IMAGE_EXTENSIONS:
            raise ValueError(f"unsupported image format {fmt!r}")
        image_id = sha256_hex(data)
        path = self.tenant_dir(tenant) / "images" / f"{image_id}.{fmt}"
        if not path.exists():
            write_atomic(path, data)
        return image_id

    def record_upload(self, tenant: str, image_id: str, record: dict) -> dict:
        """Keep an uploaded image's record (name, size) with its first upload's date; returns the stored record."""
        path = self.tenant_dir(tenant) / "uploads" / f"{image_id}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        record = {**record, "created_at": datetime.now(UTC).isoformat()}
        write_atomic(path, json.dumps(record).encode())
        return record

    def uploads(self, tenant: str) -> list[dict]:
        """The records of the tenant's uploaded images whose file is still there."""
        folder = self.tenant_dir(tenant) / "uploads"
        paths = sorted(folder.glob("*.json")) if folder.exists() else []
        records = [record | {"image_id": p.stem} for p in paths if _ID.match(p.stem) and (record := _read_json(p))]
        return [r for r in records if self.image_path(tenant, r["image_id"]) is not None]

    def delete_image(self, tenant: str, image_id: str) -> bool:
        """Remove an image (uploaded or generated), its upload record and thumbnails; False when the tenant has
        none by that id."""
        path = self.image_path(tenant, image_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        (self.tenant_dir(tenant) / "uploads" / f"{image_id}.json").unlink(missing_ok=True)
        # its cached thumbnails (fgs_service.thumbnails: thumbnails/{size}/{image_id}.webp), which would outlive it
        for thumbnail in (self.tenant_dir(tenant) / "thumbnails").glob(f"*/{image_id}.webp"):
            thumbnail.unlink(missing_ok=True)
        return True

    def image_path(self, tenant: str, image_id: str) -> Path | None:
        if not is_object_id(image_id):
            return None
        folder = self.tenant_dir(tenant) / "images"
        for ext in IMAGE_EXTENSIONS:
            path = folder / f"{image_id}.{ext}"
            if path.exists():
                return path
        return None

    # ---- classifiers ----
    def put_classifier(
        self, tenant: str, archive: bytes, archive_name: str, spec_json: bytes, hardness: Path | None, name: str = ""
    ) -> str:
        """Store a classifier as one folder, renamed into place whole; returns its content id.

        `hardness` is a file on the store's filesystem (statistics can be several GB): it is hashed in chunks and
        moved into the folder, never read whole. The same content uploaded again keeps its first name and date.
        """
        if archive_name not in ARCHIVE_NAMES:
            raise ValueError(f"archive name must be one of {ARCHIVE_NAMES}")
        digest = hashlib.sha256()
        for part in (archive, b"\0spec\0", spec_json, b"\0stats\0"):
            digest.update(part)
        if hardness is not None:
            with open(hardness, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
        classifier_id = digest.hexdigest()
        final = self.tenant_dir(tenant) / "classifiers" / classifier_id
        if final.exists():
            return classifier_id
        with atomic_directory(final) as staging:  # a lost race with the same upload keeps the identical copy
            (staging / archive_name).write_bytes(archive)
            (staging / "spec.json").write_bytes(spec_json)
            meta = {"name": name, "created_at": datetime.now(UTC).isoformat()}
            (staging / CLASSIFIER_META).write_text(json.dumps(meta), encoding="utf-8")
            if hardness is not None:
                shutil.move(hardness, staging / "hardness.safetensors")  # a rename on the same filesystem
        return classifier_id

    def classifier_dir(self, tenant: str, classifier_id: str) -> Path | None:
        if not is_object_id(classifier_id):
            return None
        path = self.tenant_dir(tenant) / "classifiers" / classifier_id
        return path if (path / "spec.json").exists() else None

    def delete_classifier(self, tenant: str, classifier_id: str) -> bool:
        """Remove a classifier; False when the tenant has none by that id. The folder is first renamed to a
        temporary name (which listings skip), so no reader sees it half deleted."""
        folder = self.classifier_dir(tenant, classifier_id)
        if folder is None:
            return False
        doomed = folder.with_name(temporary_name(folder.name))
        try:
            os.rename(folder, doomed)
        except FileNotFoundError:  # a concurrent delete won
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    @staticmethod
    def classifier_archive(folder: Path) -> Path:
        for name in ARCHIVE_NAMES:
            if (folder / name).exists():
                return folder / name
        raise FileNotFoundError(f"no archive in {folder}")
