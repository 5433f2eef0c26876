"""Contact sheets: one PNG per class, real images on the top row and synthetic ones below, for a person to look at."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from fgs_client.dataset_writer import read_manifest

LABEL_HEIGHT = 14


def _thumbnail(path: Path, size: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.pad(image.convert("RGB"), (size, size), color=(32, 32, 32))
    except OSError:
        return Image.new("RGB", (size, size), (96, 0, 0))  # unreadable: a red tile, not a crash


def write_contact_sheets(out: Path, dest: Path, per_class: int = 8, size: int = 96, seed: int = 0) -> list[Path]:
    """For each class in out/manifest.csv, write dest/<index>_<class>.png; returns the written paths."""
    rows = read_manifest(out / "manifest.csv")
    by_class: dict[int, tuple[str, list[Path], list[Path]]] = {}
    for row in rows:
        name, real, synthetic = by_class.setdefault(row.class_index, (row.class_name, [], []))
        (real if row.source == "real" else synthetic).append(out / row.path)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for class_index in sorted(by_class):
        name, real, synthetic = by_class[class_index]
        sheet = Image.new("RGB", (per_class * size, 2 * (size + LABEL_HEIGHT)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for row_index, (label, paths) in enumerate((("real", real), ("synthetic", synthetic))):
            picks = rng.sample(paths, min(per_class, len(paths)))
            top = row_index * (size + LABEL_HEIGHT)
            draw.text((2, top), f"{name}: {label} ({len(paths)})", fill=(0, 0, 0))
            for column, path in enumerate(picks):
                sheet.paste(_thumbnail(path, size), (column * size, top + LABEL_HEIGHT))
        safe = "".join(ch if ch.isalnum() else "-" for ch in name)
        path = dest / f"{class_index:04d}_{safe}.png"
        sheet.save(path)
        written.append(path)
    return written
