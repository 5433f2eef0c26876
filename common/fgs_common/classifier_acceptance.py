"""Classifier acceptance, in one place: what an uploaded classifier passes before the API stores it, and what a
stored one passes before a worker first runs it. No torch in this process: the API imports it.

    accept_upload (the API, POST /v1/classifiers)
      1. the hardness statistics, streamed by the caller into the check's scratch folder, then their header against
         the v2 layout, the file and the spec (`fgs_common.hardness_stats_format`: bounded), before any check slot
      2. the archive's layout and code (`fgs_common.classifier_archive`: no pickle, no file operators, no code in
         shape expressions, a zip bomb refused by its declared size)
      3. the archive loaded and run once in the sandbox (`fgs_common.classifier_sandbox`), holding a check slot;
         skipped by an install without torch or with FGS_CLASSIFIER_CHECK=false: a worker then runs it at first use

    checked_stored_copy (a worker, on a classifier's first load)
      1. a private copy of the stored archive: what runs is what was checked, whatever the tenant deletes meanwhile
      2. the same sandboxed check (which repeats the archive and statistics checks inside the sandbox)

A refusal is a `ClassifierRefused`: its `reason` is the error code an upload is answered with (the HTTP status is
the API's to choose), its message fgs's own words. A classifier deleted meanwhile is an `ArtifactGone`. Each check
works in a scratch folder (`check_scratch`) removed afterwards; a killed process's is swept at the next start.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fgs_common.artifact_store import ArtifactStore
from fgs_common.classifier_archive import ArchiveFormat, inspect_archive
from fgs_common.classifier_sandbox import CheckOutcome, check_scratch, run_classifier_check
from fgs_common.exceptions import (
    ArchiveTooLarge,
    ArtifactGone,
    ClassifierRefused,
    InvalidHardnessStats,
    NotAClassifierArchive,
    UnsafeClassifierArchive,
)
from fgs_common.hardness_stats_format import read_hardness_header
from fgs_common.settings import Settings
from fgs_common.wire import ClassifierOutput, ClassifierSpec

ARCHIVE_NAME = {ArchiveFormat.torchscript: "archive.pt", ArchiveFormat.torch_export: "archive.pt2"}
STATS_NAME = "hardness.safetensors"

# The archive check's refusals, by the reason an upload is answered with.
_ARCHIVE_REFUSALS: dict[type[ValueError], str] = {
    NotAClassifierArchive: "not_a_classifier_archive",
    ArchiveTooLarge: "classifier_archive_too_large",
    UnsafeClassifierArchive: "unsafe_classifier_archive",
}


@dataclass(frozen=True)
class AcceptedUpload:
    """An upload that passed, as the store keeps it. `stats` lies in the check's scratch folder until the caller
    moves it into the store, inside `accept_upload`'s `with`."""

    archive_name: str
    spec_json: bytes
    stats: Path | None


@dataclass(frozen=True)
class StoredClassifier:
    """A tenant's stored classifier: its folder in the artifact store and its spec (the bytes stored, parsed)."""

    classifier_id: str
    folder: Path
    spec_json: bytes
    spec: ClassifierSpec


@dataclass(frozen=True)
class CheckedCopy:
    """A worker's private copy of a stored archive that passed the check, and the store's statistics file."""

    archive: Path
    stats: Path | None


def _gone(classifier_id: str) -> ArtifactGone:
    return ArtifactGone(
        f"classifier {classifier_id} is no longer in the artifact store (deleted by its tenant?): upload it again"
    )


def _sandbox_check_available() -> bool:
    """Whether this install can run the sandboxed check (torch and fgs_classifier importable, neither imported)."""
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("fgs_classifier") is not None


def _refuse_unless_ok(outcome: CheckOutcome) -> None:
    if not outcome.ok:
        raise ClassifierRefused(outcome.code, outcome.message)


def _check_stats_header(stats: Path, spec: ClassifierSpec) -> None:
    """The header a worker will read, checked as the worker checks it (bounded; every tensor against the v2
    layout and the file's size) and against the spec."""
    with open(stats, "rb") as file:
        try:
            header = read_hardness_header(file.fileno())
        except InvalidHardnessStats as error:
            raise ClassifierRefused("invalid_hardness_stats", str(error)) from None
    if header.num_classes != spec.num_classes:
        raise ClassifierRefused(
            "invalid_hardness_stats",
            f"hardness statistics have {header.num_classes} classes; the spec has {spec.num_classes}",
        )
    if spec.output is not ClassifierOutput.logits_embedding:
        raise ClassifierRefused(
            "invalid_hardness_stats", "hardness statistics need a classifier whose spec output is 'logits_embedding'"
        )


def _inspected(archive: Path, settings: Settings) -> ArchiveFormat:
    try:
        return inspect_archive(archive, settings.max_classifier_unpacked_bytes)
    except tuple(_ARCHIVE_REFUSALS) as error:
        raise ClassifierRefused(_ARCHIVE_REFUSALS[type(error)], str(error)) from None


@contextmanager
def accept_upload(
    archive: bytes,
    spec: ClassifierSpec,
    settings: Settings,
    check_slot: Callable[[], AbstractContextManager[None]],
    write_stats: Callable[[Path], object] | None = None,
) -> Iterator[AcceptedUpload]:
    """Check an upload (module docstring, steps 1-3); yields it as the store keeps it, or raises ClassifierRefused.

    `write_stats(path)` streams the statistics to `path` (the caller's upload, under its own size limit);
    `check_slot()` is held while the sandboxed check runs (the API's per-tenant share of check slots).
    """
    spec_json = spec.model_dump_json().encode()
    with check_scratch(settings.data_dir) as scratch:  # swept at the API's start-up if the API is killed
        stats = None
        if write_stats is not None:
            stats = scratch / STATS_NAME
            write_stats(stats)
            _check_stats_header(stats, spec)
        archive_path = scratch / "upload"
        archive_path.write_bytes(archive)
        archive_name = ARCHIVE_NAME[_inspected(archive_path, settings)]
        if settings.classifier_check and _sandbox_check_available():
            named = archive_path.rename(scratch / archive_name)
            (scratch / "spec.json").write_bytes(spec_json)
            with check_slot():
                outcome = run_classifier_check(named, scratch / "spec.json", stats, settings, scratch)
            _refuse_unless_ok(outcome)
        yield AcceptedUpload(archive_name, spec_json, stats)


def stored_classifier(store: ArtifactStore, tenant: str, classifier_id: str) -> StoredClassifier:
    """The tenant's stored classifier with its spec; ArtifactGone when it has been deleted."""
    folder = store.classifier_dir(tenant, classifier_id)
    if folder is None:
        raise _gone(classifier_id)
    try:
        spec_json = (folder / "spec.json").read_bytes()
    except FileNotFoundError:  # deleted since classifier_dir found it
        raise _gone(classifier_id) from None
    return StoredClassifier(classifier_id, folder, spec_json, ClassifierSpec.model_validate_json(spec_json))


@contextmanager
def checked_stored_copy(
    stored: StoredClassifier, settings: Settings, on_wait: Callable[[], None] | None = None
) -> Iterator[CheckedCopy]:
    """A private copy of the stored archive, checked in the sandbox (module docstring); removed after the `with`,
    so whoever runs it opens it inside. The statistics are data, not code: they stay the store's file.

    `on_wait` is called about once a second while the check runs (a worker's heartbeat).
    """
    with check_scratch(Path(tempfile.gettempdir())) as scratch:  # a dead worker's is swept at its start-up
        try:
            source = ArtifactStore.classifier_archive(stored.folder)
            archive = scratch / f"classifier{source.suffix}"
            shutil.copyfile(source, archive)
        except FileNotFoundError:
            raise _gone(stored.classifier_id) from None
        stats = stored.folder / STATS_NAME
        stats = stats if stats.exists() else None
        if not stored.folder.exists():  # deleted meanwhile: not loaded (and cached) without its statistics
            raise _gone(stored.classifier_id)
        spec_path = scratch / "spec.json"
        spec_path.write_bytes(stored.spec_json)
        _refuse_unless_ok(run_classifier_check(archive, spec_path, stats, settings, scratch, on_wait=on_wait))
        yield CheckedCopy(archive, stats)
