"""Stored classifiers as their wire records: what the classifier and generate routers read."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from fgs_common.artifact_store import CLASSIFIER_META, ArtifactStore
from fgs_common.wire import ClassifierSpec, ClassifierUploaded


def classifier_record(store: ArtifactStore, tenant: str, classifier_id: str) -> ClassifierUploaded | None:
    """The tenant's classifier `classifier_id`; None when the tenant has none by that id, also when a concurrent
    delete takes it away between the existence check and the reads (its files then vanish, whole folder at once)."""
    folder = store.classifier_dir(tenant, classifier_id)
    if folder is None:
        return None
    try:
        spec = ClassifierSpec.model_validate_json((folder / "spec.json").read_bytes())
        has_stats = (folder / "hardness.safetensors").exists()
        meta_path = folder / CLASSIFIER_META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        else:  # stored before classifiers had names: the folder's date stands for the upload's
            meta = {"name": "", "created_at": datetime.fromtimestamp(folder.stat().st_mtime, UTC).isoformat()}
    except FileNotFoundError:
        return None
    return ClassifierUploaded(classifier_id=classifier_id, spec=spec, has_hardness_stats=has_stats, **meta)


def classifier_records(store: ArtifactStore, tenant: str) -> list[ClassifierUploaded]:
    """All of the tenant's classifiers, oldest first (folders still being written or deleted are not listed)."""
    folder = store.tenant_dir(tenant) / "classifiers"
    ids = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
    records = [classifier_record(store, tenant, i) for i in ids]
    return sorted((r for r in records if r is not None), key=lambda r: (r.created_at, r.classifier_id))
