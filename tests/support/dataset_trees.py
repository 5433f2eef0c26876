"""Mini datasets written in the layouts the client reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, value: int = 0, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path, format=fmt)


def make_nicopp_tree(root: Path, counts: dict[tuple[str, str], int]) -> None:
    """track_1/public_dg_0416/train/<context>/<class>/*.jpg and dg_label_id_mapping.json."""
    classes = sorted({c for c, _ in counts})
    (root / "track_1").mkdir(parents=True, exist_ok=True)
    (root / "track_1" / "dg_label_id_mapping.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}))
    for context in ("autumn", "dim", "grass", "outdoor", "rock", "water"):
        (root / "track_1/public_dg_0416/train" / context).mkdir(parents=True, exist_ok=True)
    for (class_name, context), n in counts.items():
        for i in range(n):
            write_image(root / "track_1/public_dg_0416/train" / context / class_name / f"{i}.jpg", i, "JPEG")
