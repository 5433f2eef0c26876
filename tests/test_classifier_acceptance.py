"""Classifier acceptance (fgs_common.classifier_acceptance) without the sandbox's process: the order of its steps,
what each refusal says, and that nothing is left in the data directory. The upload route and the worker's first
load are tested through a real API and worker in test_service_classifier_sandbox.py, test_service_hardness_upload.py
and test_worker_failures.py."""

from __future__ import annotations

import io
import zipfile
from contextlib import nullcontext
from pathlib import Path

import pytest

from fgs_common.artifact_store import ArtifactStore
from fgs_common.classifier_acceptance import accept_upload, stored_classifier
from fgs_common.exceptions import ArtifactGone, ClassifierRefused, InvalidClassifier
from fgs_common.hardness_stats_format import encode_header, layout, metadata
from fgs_common.settings import Settings
from fgs_common.wire import ClassifierOutput, ClassifierSpec

SPEC = ClassifierSpec(num_classes=3, input_size=8, output=ClassifierOutput.logits_embedding)


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, classifier_check=False)


def _stats_writer(num_classes: int):
    entries = layout(num_classes, 4, [1] * num_classes)

    def write(path: Path) -> None:
        head = encode_header(entries, metadata(num_classes, 4))
        with open(path, "wb") as file:
            file.write(head)
            file.truncate(len(head) + sum(e.nbytes for e in entries))

    return write


def _torchscript_shaped_zip() -> bytes:
    """The member names of a TorchScript archive, nothing torch could run."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in (("constants.pkl", b"\x80\x02]q\x00."), ("code/m.py", b"x = 1\n"), ("version", b"3\n")):
            archive.writestr(f"m/{name}", data)
    return buffer.getvalue()


def _slot_never_taken():
    raise AssertionError("a check slot was asked for")


def test_statistics_are_refused_before_the_archive_is_read(tmp_path):
    """Statistics of the wrong class count are named as such, though the archive is no archive at all."""
    with pytest.raises(ClassifierRefused) as refused:
        with accept_upload(b"not a zip", SPEC, _settings(tmp_path), _slot_never_taken, _stats_writer(5)):
            pass
    assert refused.value.reason == "invalid_hardness_stats"
    assert str(refused.value) == "hardness statistics have 5 classes; the spec has 3"
    assert list(tmp_path.iterdir()) == []  # the scratch folder went with the refusal


def test_an_archive_refusal_carries_its_reason(tmp_path):
    with pytest.raises(ClassifierRefused) as refused:
        with accept_upload(b"\x80\x04K\x01.", SPEC, _settings(tmp_path), _slot_never_taken):
            pass
    assert refused.value.reason == "not_a_classifier_archive"
    assert isinstance(refused.value, InvalidClassifier) and refused.value.code == "invalid_classifier"
    assert list(tmp_path.iterdir()) == []


def test_an_accepted_upload_is_what_the_store_keeps(tmp_path):
    """With the sandboxed check off, an archive of the right layout passes; its statistics wait in the scratch
    folder for the store, which is gone once the `with` ends."""
    with accept_upload(_torchscript_shaped_zip(), SPEC, _settings(tmp_path), nullcontext, _stats_writer(3)) as ok:
        assert ok.archive_name == "archive.pt"
        assert ok.spec_json == SPEC.model_dump_json().encode()
        assert ok.stats is not None and ok.stats.exists()
        classifier_id = ArtifactStore(tmp_path / "store").put_classifier(
            "alpha", b"archive", ok.archive_name, ok.spec_json, ok.stats
        )
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    stored = stored_classifier(ArtifactStore(tmp_path / "store"), "alpha", classifier_id)
    assert stored.spec == SPEC and (stored.folder / "hardness.safetensors").exists()


def test_a_deleted_classifier_is_gone_not_retried(tmp_path):
    with pytest.raises(ArtifactGone, match="classifier " + "a" * 64 + " is no longer in the artifact store"):
        stored_classifier(ArtifactStore(tmp_path), "alpha", "a" * 64)
