"""Stored classifiers as their wire records: what the classifier and generate routers read."""

from __future__ import annotations

from fgs_common.artifact_store import ArtifactStore
from fgs_common.wire import ClassifierSpec, ClassifierUploaded


def classifier_record(store: ArtifactStore, tenant: str, classifier_id: str) -> ClassifierUploaded | None:
    """The tenant's classifier `classifier_id`; None when the tenant has none by that id."""
    folder = store.classifier_dir(tenant, classifier_id)
    if folder is None:
        return None
    spec = ClassifierSpec.model_validate_json((folder / "spec.json").read_bytes())
    has_stats = (folder / "hardness.safetensors").exists()
    return ClassifierUploaded(id=classifier_id, spec=spec, has_hardness_stats=has_stats)


def classifier_records(store: ArtifactStore, tenant: str) -> list[ClassifierUploaded]:
    """All of the tenant's classifiers, by id (folders still being written are not listed)."""
    folder = store.tenant_dir(tenant) / "classifiers"
    ids = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
    records = [classifier_record(store, tenant, i) for i in ids]
    return [record for record in records if record is not None]
