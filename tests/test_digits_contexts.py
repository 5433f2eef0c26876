"""Digits-Contexts (NICO++ in miniature): the nico++ reader reads it unchanged; counts, groups, empty groups,
group-balanced held-out splits, disjointness from each other and from the generator's digits, determinism."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fgs_client.cli import app
from fgs_client.dataset_readers import read_dataset
from fgs_client.digits_contexts import (
    CONTEXTS,
    METADATA_FILE,
    TEST_PER_GROUP,
    TRAIN_PROFILE,
    VALIDATION_PER_GROUP,
    build_digits_contexts,
    context_background,
    generator_indices,
    read_held_out,
    train_contexts,
)
from fgs_client.digits_lt import CLASS_NAMES, load_digit_arrays


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("contexts") / "mini"
    result = CliRunner().invoke(app, ["digits-contexts", "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # line breaks folded: see the rebuild test below
    assert "360 images in 40 of 60 class x context groups (largest 24, 20 empty)" in said
    assert "--dataset nico++" in said and "--target 24" in said
    return out


def test_the_nicopp_reader_reads_it_unchanged(built: Path) -> None:
    dataset = read_dataset("nico++", built)
    assert dataset.class_names == list(CLASS_NAMES)  # from track_1/dg_label_id_mapping.json
    assert dataset.groups == list(CONTEXTS) == ["autumn", "dim", "grass", "outdoor", "rock", "water"]
    assert dataset.skipped == [] and len(dataset.images) == 10 * sum(TRAIN_PROFILE) == 360
    assert dataset.prompt(7, "water") == "seven in water"
    counts = dataset.unit_counts()
    assert len(counts) == 60 and sum(n == 0 for n in counts.values()) == 20
    meta = json.loads((built / METADATA_FILE).read_text())
    for c, name in enumerate(CLASS_NAMES):
        row = {context: counts[(c, context)] for context in CONTEXTS}
        assert row == meta["train_counts"][name]
        # concentrated: the main context holds two thirds of the class; two contexts hold none
        assert sorted(row.values(), reverse=True) == list(TRAIN_PROFILE)
        assert max(row, key=row.get) == CONTEXTS[c % 6] == train_contexts(c)[0]
    # every context is the main one of some class: the context predicts the class in train (the spurious cue)
    assert {train_contexts(c)[0] for c in range(10)} == set(CONTEXTS)
    assert sorted(meta["empty_groups"]) == sorted(f"{CLASS_NAMES[c]}/{g}" for (c, g), n in counts.items() if n == 0)
    assert {rel for _, rel in dataset.layout.passthrough} == {"track_1/dg_label_id_mapping.json"}


def test_held_out_splits_are_group_balanced_and_all_splits_disjoint(built: Path) -> None:
    meta = json.loads((built / METADATA_FILE).read_text())
    _, labels = load_digit_arrays()
    validation, test = read_held_out(built, "validation"), read_held_out(built, "test")
    assert Counter((c, g) for _, c, g in validation) == {
        (c, g): VALIDATION_PER_GROUP for c in range(10) for g in CONTEXTS
    }
    assert Counter((c, g) for _, c, g in test) == {(c, g): TEST_PER_GROUP for c in range(10) for g in CONTEXTS}
    parts = {
        "train": {int(p.stem) for p in (built / "track_1/public_dg_0416/train").rglob("*.png")},
        "validation": {int(p.stem) for p, _, _ in validation},
        "test": {int(p.stem) for p, _, _ in test},
        "generator": set(generator_indices()),
    }
    assert parts["generator"] == set(meta["indices"]["generator"])
    assert sum(map(len, parts.values())) == len(set().union(*parts.values())) == len(labels)  # disjoint, complete
    for part in ("train", "validation", "test"):
        assert parts[part] == {index for index, _ in meta["indices"][part]}
    # a file's folder names its digit's true class
    for path, class_index, _ in test[::37]:
        assert labels[int(path.stem)] == class_index
    # the generator keeps at least 42 digits of every class
    assert min(Counter(labels[sorted(parts["generator"])].tolist()).values()) >= 42


def test_contexts_differ_by_eye(built: Path) -> None:
    """Each context's mean colour is far from every other's (a pixel-mean classifier tells them apart)."""
    means = {}
    for context in CONTEXTS:
        pixels = [
            np.asarray(Image.open(p), np.float32) / 255 for p in sorted((built / "test" / context).rglob("*.png"))
        ]
        means[context] = np.mean([image.reshape(-1, 3).mean(0) for image in pixels], axis=0)
        assert np.asarray(Image.open(next((built / "test" / context).rglob("*.png")))).shape == (32, 32, 3)
    distances = [np.abs(means[a] - means[b]).sum() for a in CONTEXTS for b in CONTEXTS if a < b]
    assert min(distances) > 0.15, means
    with pytest.raises(ValueError, match="unknown context"):
        context_background("beach", np.random.default_rng(0))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_seeded_rebuild_is_identical_and_the_command_does_not_overwrite(built: Path, tmp_path: Path) -> None:
    again = build_digits_contexts(tmp_path / "again")
    assert tree_digest(again) == tree_digest(built)
    result = CliRunner().invoke(app, ["digits-contexts", "--out", str(built)])
    # line breaks folded: the CLI's console wraps at the terminal's width (fixed at import when COLUMNS is set
    # then), and a long tmp path (a pytest-xdist worker's) moves where they fall
    assert result.exit_code == 0 and "already holds Digits-Contexts" in " ".join(result.output.split())
