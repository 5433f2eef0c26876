"""Classifier upload: a TorchScript / torch.export archive, its spec JSON and optional hardness statistics.

The route parses the form, reads the parts under their size limits and hands them to
`fgs_common.classifier_acceptance.accept_upload`, the one place that says what a classifier must pass (the
statistics' header against the spec, the archive's layout and code, then one run in a sandboxed subprocess; the
worker's first load passes the same module). At most FGS_CLASSIFIER_CHECKS_AT_ONCE checks run at once, at most
FGS_CLASSIFIER_CHECKS_PER_TENANT of them one tenant's: an upload beyond its tenant's share is a 429 with
Retry-After, one within it waits for a slot. Only a classifier that passes is stored: a refusal is a 4xx whose
message fgs wrote (never the check's output) and nothing is written. An API-only install without torch skips the
subprocess (FGS_CLASSIFIER_CHECK=false, or torch absent); the worker then runs the same sandboxed check at first
use and fails that job with its message.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from pydantic import ValidationError

from fgs_common.classifier_acceptance import accept_upload
from fgs_common.exceptions import ClassifierRefused
from fgs_common.wire import CLASSIFIER_SPEC_EXAMPLE, ClassifierSpec, ClassifierUploaded
from fgs_service.classifier_records import classifier_record, classifier_records
from fgs_service.deps import CheckSlotsDep, SettingsDep, StoreDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError, not_found
from fgs_service.uploads import copy_limited, read_limited

router = APIRouter(prefix="/v1/classifiers", tags=["classifiers"], responses=ERROR_RESPONSES)

# Statuses of refusals other than 422: not a classifier archive at all, and a check this host cannot run (not the
# uploader's to fix by changing the archive).
_REFUSAL_STATUS = {"not_a_classifier_archive": 415, "classifier_check_unavailable": 503}


def _parse_spec(spec: str) -> ClassifierSpec:
    try:
        return ClassifierSpec.model_validate_json(spec)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in error.errors()[:5]
        )
        raise ApiError(422, "invalid_spec", f"classifier spec is not a valid ClassifierSpec: {details}") from None


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
    write_stats = None
    if hardness_stats is not None:
        write_stats = partial(
            copy_limited,
            hardness_stats,
            limit=settings.max_hardness_stats_bytes,
            what="hardness statistics",
            setting="FGS_MAX_HARDNESS_STATS_BYTES",
        )
    check_slot = partial(check_slots.hold, tenant.name)
    try:
        with accept_upload(archive_bytes, parsed, settings, check_slot, write_stats) as accepted:
            classifier_id = store.put_classifier(
                tenant.name,
                archive_bytes,
                accepted.archive_name,
                accepted.spec_json,
                accepted.stats,
                name=name or archive.filename or "",
            )
    except ClassifierRefused as refused:
        raise ApiError(_REFUSAL_STATUS.get(refused.reason, 422), refused.reason, str(refused)) from None
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
