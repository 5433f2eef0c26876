"""Writing the balanced dataset: real files carried over, synthetic PNGs written atomically, the layout's
index files, `manifest.csv` (one row per image, real and synthetic), and what other tools load as it is:
a `metadata.csv` for Hugging Face `datasets`' imagefolder loader and, on request, class-per-folder links for
torchvision's `ImageFolder`."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from io import BytesIO
from pathlib import Path

from PIL import Image

from fgs_client.dataset_readers import ScannedDataset, SyntheticImage
from fgs_common.atomic_files import atomic_path, atomic_writer, is_temporary_name, write_atomic
from fgs_common.wire import GenerationParams

MANIFEST_NAME = "manifest.csv"
HF_METADATA_NAME = "metadata.csv"  # the name Hugging Face datasets' imagefolder loader looks for
HF_FEATURES_NAME = "features.json"  # datasets.Features.from_dict(json.load(...)): label as a ClassLabel
REAL_FILE_MODES = ("link", "copy")


@dataclass(frozen=True)
class ManifestRow:
    path: str  # relative to the output directory
    class_index: int
    class_name: str
    group: str
    source: str  # real | synthetic
    seed: str = ""
    criterion: str = ""
    omega: str = ""
    gamma: str = ""
    dropout_p: str = ""
    criterion_value: str = ""
    job_id: str = ""
    prompt: str = ""  # the prompt a synthetic image was generated with


# The CSV says `class` where the dataclass must say class_name.
MANIFEST_COLUMNS = ["class" if f.name == "class_name" else f.name for f in fields(ManifestRow)]
# The GenerationParams fields a synthetic image's row carries, as the service stored its request.
GENERATION_COLUMNS = ("criterion", "omega", "gamma", "dropout_p")


def generation_columns(params: GenerationParams) -> dict[str, str]:
    """The manifest's generation columns of an image, from the (stored) request it was generated with."""
    values = params.model_dump(mode="json", include=set(GENERATION_COLUMNS))
    return {name: str(values[name]) for name in GENERATION_COLUMNS}


def _to_csv(row: ManifestRow) -> dict:
    record = asdict(row)
    record["class"] = record.pop("class_name")
    return record


def write_manifest(out: Path, rows: list[ManifestRow]) -> Path:
    path = out / MANIFEST_NAME
    with atomic_writer(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(_to_csv(row) for row in rows)
    return path


def read_manifest(path: Path) -> list[ManifestRow]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = []
        for record in csv.DictReader(handle):
            record["class_name"] = record.pop("class")
            record["class_index"] = int(record["class_index"])
            rows.append(ManifestRow(**record))
        return rows


def carry_file(source: Path, dest: Path, mode: str) -> None:
    """Put a real file at dest: a hard link (a symlink across file systems) or a copy; an existing dest is kept."""
    if os.path.lexists(dest):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        try:
            os.link(source, dest)
        except OSError:
            os.symlink(source.resolve(), dest)
        return
    with atomic_path(dest) as temporary:
        shutil.copy2(source, temporary)


def carry_real_files(dataset: ScannedDataset, out: Path, mode: str) -> None:
    """Carry the real training images and the layout's passthrough files (other splits, label maps) into out."""
    if mode not in REAL_FILE_MODES:
        raise ValueError(f"real-files mode must be one of {REAL_FILE_MODES}, got {mode!r}")
    for image in dataset.images:
        carry_file(image.path, out / image.rel_path, mode)
    for source, rel in dataset.layout.passthrough:
        carry_file(source, out / rel, mode)


def write_png_atomic(dest: Path, data: bytes) -> None:
    """Check that data is a complete PNG, then write it under a temporary name, fsync and rename:
    a crash leaves either no file or the whole file."""
    with Image.open(BytesIO(data)) as image:
        if image.format != "PNG":
            raise ValueError(f"expected a PNG for {dest.name}, got {image.format}")
        image.load()
    write_atomic(dest, data)


def remove_temporary_files(directory: Path) -> int:
    """Delete what an interrupted atomic write left behind (`fgs_common.atomic_files` temporary names)."""
    removed = 0
    if directory.is_dir():
        for path in directory.iterdir():
            if is_temporary_name(path.name) and path.is_file():
                path.unlink()
                removed += 1
    return removed


def write_index_files(out: Path, dataset: ScannedDataset, synthetic: list[SyntheticImage]) -> list[str]:
    return dataset.layout.write_index(out, dataset, dataset.images, synthetic)


def write_hf_metadata(out: Path, rows: list[ManifestRow], folder: Path | None = None) -> Path | None:
    """`metadata.csv` for `datasets.load_dataset("imagefolder", data_dir=...)`, in `folder` of `out` (default: the
    folder that holds every image; its `file_name` column is relative to that folder): file_name, label (the class
    index), class_name, group (empty without groups), source; and beside it `features.json`, the `datasets.Features`
    that make `label` a ClassLabel with the class names and `group` a string (read alone, an empty column is float
    NaN). None when the layout's own index already has that name there (NICO++'s SubpopBench metadata.csv)."""
    if not rows:
        return None
    if folder is None:
        folder = Path(os.path.commonpath([str(Path(row.path).parent) for row in rows]))
    path = out / folder / HF_METADATA_NAME
    if path.exists() and not _is_hf_metadata(path):
        return None
    with atomic_writer(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "label", "class_name", "group", "source"])
        for row in rows:
            rel = Path(row.path).relative_to(folder).as_posix()
            writer.writerow([rel, row.class_index, row.class_name, row.group, row.source])
    names = class_folder_names(rows)  # a ClassLabel's names are unique: two "crane" classes become 134-, 517-crane
    string = {"dtype": "string", "_type": "Value"}
    features = {
        "image": {"_type": "Image"},
        "label": {"names": [names.get(i, str(i)) for i in range(max(names) + 1)], "_type": "ClassLabel"},
        "class_name": string,
        "group": string,
        "source": string,
    }
    write_atomic(out / folder / HF_FEATURES_NAME, (json.dumps(features, indent=1) + "\n").encode())
    return path


def _is_hf_metadata(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return handle.readline().startswith("file_name,")


def class_folder_names(rows: list[ManifestRow]) -> dict[int, str]:
    """The folder of each class index: its name, or, when two classes share a name (ImageNet has two "crane"
    classes), `<index>-<name>` for every class, zero-padded so that ImageFolder's sorted order is the index order."""
    names = {row.class_index: row.class_name for row in rows}
    if len(set(names.values())) == len(names):
        return names
    width = len(str(max(names)))
    return {index: f"{index:0{width}d}-{name}" for index, name in names.items()}


def write_class_folders(out: Path, dest: Path, mode: str = "link") -> int:
    """torchvision's ImageFolder layout `dest/<class>/<file>` of every image in `out`'s manifest, real and
    synthetic (hard links, or copies); a file is named after its path in `out` so that none collide, a folder
    after its class (`class_folder_names`: index-prefixed when class names repeat). Also writes `dest/metadata.csv`
    for Hugging Face datasets (the way to it for layouts whose own index is called metadata.csv: NICO++)."""
    rows = read_manifest(out / MANIFEST_NAME)
    folders = class_folder_names(rows)
    placed = []
    for row in rows:
        path = f"{folders[row.class_index]}/{row.path.replace('/', '__')}"
        carry_file(out / row.path, dest / path, mode)
        placed.append(replace(row, path=path, class_name=folders[row.class_index]))  # labelled as the folders are
    write_hf_metadata(dest, placed, folder=Path("."))
    return len(rows)
