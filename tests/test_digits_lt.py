"""Digits-LT builder: counts, imbalance, disjointness from the generator split, determinism, file layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgs_client.digits_lt import (
    CLASS_NAMES,
    build_digits_lt,
    digits_split,
    generator_indices,
    load_digit_arrays,
    shot_group,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digits_lt(tmp_path_factory.mktemp("digits_lt"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_counts_ratio_and_thresholds(built: Path) -> None:
    meta = json.loads((built / "digits_lt.json").read_text())
    train = [len(list((built / "train" / name).glob("*.png"))) for name in CLASS_NAMES]
    validation = [len(list((built / "validation" / name).glob("*.png"))) for name in CLASS_NAMES]
    test = [len(list((built / "test" / name).glob("*.png"))) for name in CLASS_NAMES]
    assert validation == meta["validation_counts"] == [40] * 10
    assert train == meta["train_counts"]
    assert test == meta["test_counts"]
    assert max(train) >= 30 * min(train)
    assert min(train) <= 3
    assert meta["imbalance_ratio"] >= 30
    few = [c for c, name in enumerate(CLASS_NAMES) if meta["shot_groups"][name] == "few"]
    many = [c for c, name in enumerate(CLASS_NAMES) if meta["shot_groups"][name] == "many"]
    assert few and many and meta["shot_groups"][CLASS_NAMES[int(np.argmin(train))]] == "few"
    assert test == [40] * 10
    assert len(set(test)) == 1  # balanced
    assert meta["prompts"][7] == "a handwritten digit seven"
    assert [shot_group(n) for n in train] == [meta["shot_groups"][name] for name in CLASS_NAMES]


def test_splits_are_disjoint_and_cover_all_digits(built: Path) -> None:
    meta = json.loads((built / "digits_lt.json").read_text())
    generator = set(generator_indices())
    train, test = set(meta["indices"]["train"]), set(meta["indices"]["test"])
    validation = set(meta["indices"]["validation"])
    assert generator == set(meta["indices"]["generator"])
    parts = (generator, train, validation, test)
    assert all(not a & b for i, a in enumerate(parts) for b in parts[i + 1 :])
    _, labels = load_digit_arrays()
    assert len(generator | train | validation | test) == len(labels) == 1797
    # The files are exactly the indices of their split, in the folder of their label.
    for part, indices in (("train", train), ("validation", validation), ("test", test)):
        on_disk = {(int(p.stem), p.parent.name) for p in (built / part).glob("*/*.png")}
        assert on_disk == {(i, CLASS_NAMES[labels[i]]) for i in indices}


def test_images_are_original_style_32px_rgb(built: Path) -> None:
    path = next((built / "test" / "seven").glob("*.png"))
    image = Image.open(path)
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[:2].ravel(), pixels[-2:].ravel()])
    assert np.median(border) > 240  # white paper (strokes may touch the edge)
    assert pixels.min() < 100  # dark ink


def test_build_is_deterministic(built: Path, tmp_path: Path) -> None:
    assert tree_digest(build_digits_lt(tmp_path / "again")) == tree_digest(built)
    _, labels = load_digit_arrays()
    assert digits_split(labels, seed=1).train != digits_split(labels).train
