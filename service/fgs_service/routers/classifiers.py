"""Classifier upload: a TorchScript / torch.export archive, its spec JSON and optional hardness statistics.

The service never imports torch, so it checks what it can without it (size, zip layout of a TorchScript or
torch.export archive whose contents cannot run code: `fgs_common.classifier_archive.inspect_archive`; spec JSON; the
hardness statistics' header, `fgs_common.hardness_stats_format`) and then runs the archive once in a sandboxed
subprocess (`fgs_common.classifier_sandbox`), which loads it the way a worker will and checks its outputs against
the spec. At most FGS_CLASSIFIER_CHECKS_AT_ONCE checks run at once, at most FGS_CLASSIFIER_CHECKS_PER_TENANT of them
one tenant's: an upload beyond its tenant's share is a 429 with Retry-After, one within it waits for a slot. Only a
classifier that passes is stored: a failure is a 4xx whose message fgs wrote (never the check's output) and nothing
is written. An API-only install without torch skips the subprocess (FGS_CLASSIFIER_CHECK=false, or torch absent);
the worker then runs the same sandboxed check at first use and fails that job with its message.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from pydantic import ValidationError

from fgs_common.classifier_archive import (
    ArchiveFormat,
    ArchiveTooLarge,
    NotAClassifierArchive,
    UnsafeClassifierArchive,
    inspect_archive,
)
from fgs_common.classifier_sandbox import check_scratch, run_classifier_check
from fgs_common.exceptions import InvalidHardnessStats
from fgs_common.hardness_stats_format import read_hardness_header
from fgs_common.settings import Settings
from fgs_common.wire import CLASSIFIER_SPEC_EXAMPLE, ClassifierOutput, ClassifierSpec, ClassifierUploaded
from fgs_service.classifier_records import classifier_record, classifier_records
from fgs_service.deps import CheckSlotsDep, SettingsDep, StoreDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError, not_found
from fgs_service.tenant_limits import CheckSlots
from fgs_service.uploads import copy_limited, read_limited

router = APIRouter(prefix="/v1/classifiers", tags=["classifiers"], responses=ERROR_RESPONSES)

_ARCHIVE_NAME = {ArchiveFormat.torchscript: "archive.pt", ArchiveFormat.torch_export: "archive.pt2"}


def _parse_spec(spec: str) -> ClassifierSpec:
    try:
        return ClassifierSpec.model_validate_json(spec)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in error.errors()[:5]
        )
        raise ApiError(422, "invalid_spec", f"classifier spec is not a valid ClassifierSpec: {details}") from None


def _check_hardness_stats(path: Path, spec: ClassifierSpec) -> None:
    """The header a worker will read, checked as the worker checks it (bounded; every tensor against the v2
    layout and the file's size) and against the spec, before any check slot is taken."""
    with open(path, "rb") as file:
        try:
            header = read_hardness_header(file.fileno())
        except InvalidHardnessStats as error:
            raise ApiError(422, "invalid_hardness_stats", str(error)) from None
    if header.num_classes != spec.num_classes:
        raise ApiError(
            422,
            "invalid_hardness_stats",
            f"hardness statistics have {header.num_classes} classes; the spec has {spec.num_classes}",
        )
    if spec.output is not ClassifierOutput.logits_embedding:
        raise ApiError(
            422,
            "invalid_hardness_stats",
            "hardness statistics need a classifier whose spec output is 'logits_embedding'",
        )


def _worker_check_available() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("fgs_classifier") is not None


# Statuses of the check's outcomes that are not the uploader's to fix by changing the archive.
_CHECK_STATUS = {"classifier_check_unavailable": 503}


def _run_classifier_check(
    archive: Path, spec: Path, stats: Path | None, settings: Settings, slots: CheckSlots, tenant: str
) -> None:
    """Load and run the classifier in the sandbox (torch stays out of the API process); 429 when the tenant's
    share of the check slots is in use (`CheckSlots`)."""
    with slots.hold(tenant):
        outcome = run_classifier_check(archive, spec, stats, settings, scratch=archive.parent)
    if not outcome.ok:
        raise ApiError(_CHECK_STATUS.get(outcome.code, 422), outcome.code, outcome.message)


def _validated(
    archive: bytes,
    spec_json: bytes,
    stats: Path | None,
    settings: Settings,
    scratch: Path,
    slots: CheckSlots,
    tenant: str,
) -> ArchiveFormat:
    archive_path = scratch / "upload"
    archive_path.write_bytes(archive)
    try:
        archive_format = inspect_archive(archive_path, settings.max_classifier_unpacked_bytes)
    except NotAClassifierArchive as error:
        raise ApiError(415, "not_a_classifier_archive", str(error)) from None
    except ArchiveTooLarge as error:
        raise ApiError(422, "classifier_archive_too_large", str(error)) from None
    except UnsafeClassifierArchive as error:
        raise ApiError(422, "unsafe_classifier_archive", str(error)) from None
    if settings.classifier_check and _worker_check_available():
        named = archive_path.rename(scratch / _ARCHIVE_NAME[archive_format])
        (scratch / "spec.json").write_bytes(spec_json)
        _run_classifier_check(named, scratch / "spec.json", stats, settings, slots, tenant)
    return archive_format


@router.post("", status_code=201)
def upload_classifier(
    archive: UploadFile,
    spec: Annotated[str, Form(description="ClassifierSpec JSON", examples=[json.dumps(CLASSIFIER_SPEC_EXAMPLE)])],
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    check_slots: CheckSlotsDep,
    hardness_stats: UploadFile | None = None,
    name: Annotated[
        str | None, Form(max_length=200, description="a name to list it by (default: the archive's file name)")
    ] = None,
) -> ClassifierUploaded:
    """Check and store a classifier; its id is a digest of archive, spec and statistics.

    The statistics (several GB at ImageNet scale) are copied chunk by chunk to a scratch file in the data
    directory and moved into the store from there: the API never holds them in memory.
    """
    parsed = _parse_spec(spec)
    archive_bytes = read_limited(archive, settings.max_classifier_bytes, "classifier archive")
    spec_json = parsed.model_dump_json().encode()
    with check_scratch(settings.data_dir) as scratch:  # swept at the API's start-up if the API is killed
        stats_path = None
        if hardness_stats is not None:
            stats_path = scratch / "hardness.safetensors"
            copy_limited(
                hardness_stats,
                stats_path,
                settings.max_hardness_stats_bytes,
                "hardness statistics",
                "FGS_MAX_HARDNESS_STATS_BYTES",
            )
            _check_hardness_stats(stats_path, parsed)
        archive_format = _validated(archive_bytes, spec_json, stats_path, settings, scratch, check_slots, tenant.name)
        archive_name = _ARCHIVE_NAME[archive_format]
        classifier_id = store.put_classifier(
            tenant.name, archive_bytes, archive_name, spec_json, stats_path, name=name or archive.filename or ""
        )
    record = classifier_record(store, tenant.name, classifier_id)
    if record is None:  # deleted by another request of the tenant's since it was stored
        raise not_found("classifier", classifier_id)
    return record


@router.get("/{classifier_id}")
def get_classifier(classifier_id: str, tenant: TenantDep, store: StoreDep) -> ClassifierUploaded:
    record = classifier_record(store, tenant.name, classifier_id)
    if record is None:
        raise not_found("classifier", classifier_id)
    return record


@router.get("")
def list_classifiers(tenant: TenantDep, store: StoreDep) -> list[ClassifierUploaded]:
    """The caller's classifiers, oldest first, with their names and upload dates."""
    return classifier_records(store, tenant.name)


@router.delete("/{classifier_id}", status_code=204)
def delete_classifier(classifier_id: str, tenant: TenantDep, store: StoreDep) -> None:
    """Delete a classifier. A job that still needs it and has not started fails with `classifier ... is no longer
    in the artifact store`; a job already running keeps the copy its worker loaded and finishes."""
    if not store.delete_classifier(tenant.name, classifier_id):
        raise not_found("classifier", classifier_id)
