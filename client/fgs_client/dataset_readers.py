"""Dataset readers: the user's training set as it lies on disk, as (path, class, group) records.

Each reader also knows its own layout, so the balanced result is written back in the same form
(`DatasetLayout`): where a synthetic image of a class/group goes and which index files
(metadata.csv, split files, JSON descriptions) describe the result.
No torch here: the client core installs without it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from fgs_client.digits_lt import METADATA_FILE as DIGITS_LT_METADATA
from fgs_common.atomic_files import atomic_writer, write_atomic
from fgs_common.exceptions import UserInputError
from fgs_common.wire import ClassifierSpec

DATASET_NAMES = ("nico++", "imagenet-lt", "imagefolder", "digits-lt")
NICOPP_TRAIN_DIR = "track_1/public_dg_0416/train"
NICOPP_MAPPING = "track_1/dg_label_id_mapping.json"


class DatasetError(UserInputError):
    """The dataset cannot be read as the named layout (missing root, missing index file, bad index)."""


def read_classifier_spec(path: Path) -> ClassifierSpec:
    """The team's ClassifierSpec JSON file; a UserInputError says what is wrong with it."""
    try:
        return ClassifierSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValidationError) as error:
        raise UserInputError(f"cannot read the classifier spec {path}: {error}") from None


@dataclass(frozen=True)
class RealImage:
    path: Path  # the file on disk
    rel_path: str  # posix path relative to the dataset root: its place in the written result
    class_index: int
    group: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class SyntheticImage:
    rel_path: str
    class_index: int
    group: str | None


@dataclass
class DatasetLayout:
    """Where results go, in the reader's own layout. Subclasses add their index files."""

    passthrough: list[tuple[Path, str]] = field(default_factory=list)  # (source file, rel path): carried over as is

    def synthetic_dir(self, dataset: ScannedDataset, class_index: int, group: str | None) -> str:
        raise NotImplementedError

    def write_index(
        self, out: Path, dataset: ScannedDataset, real: list[RealImage], synthetic: list[SyntheticImage]
    ) -> list[str]:
        """Write the layout's index files under out; returns their rel paths."""
        return []


@dataclass
class ScannedDataset:
    name: str
    root: Path | None
    class_names: list[str]
    groups: list[str] | None  # None: the balancing unit is the class; else class x group
    images: list[RealImage]
    skipped: list[SkippedFile]
    layout: DatasetLayout
    prompt_template: str = "{class_name}"  # formatted with class_name and group
    class_prompts: list[str] | None = None  # a prompt per class, when the dataset describes its own

    def units(self) -> list[tuple[int, str | None]]:
        if self.groups is None:
            return [(c, None) for c in range(len(self.class_names))]
        return [(c, g) for c in range(len(self.class_names)) for g in self.groups]

    def unit_counts(self) -> dict[tuple[int, str | None], int]:
        counts = Counter((im.class_index, im.group) for im in self.images)
        return {unit: counts.get(unit, 0) for unit in self.units()}

    def prompt(self, class_index: int, group: str | None) -> str:
        if self.class_prompts is not None:
            return self.class_prompts[class_index]
        return self.prompt_template.format(class_name=self.class_names[class_index], group=group or "")


def packaged_lines(name: str) -> list[str]:
    text = resources.files("fgs_client").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def packaged_path(name: str) -> Path:
    return Path(str(resources.files("fgs_client").joinpath("data", name)))


def check_image(path: Path) -> str | None:
    """None when PIL recognises the file as an image, else why not (header only: cheap on large sets)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - parsing the header is the check
        return None
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError) as error:
        return f"unreadable: {error.__class__.__name__}: {error}"


def _require_dir(root: Path) -> Path:
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory")
    return root


def _files_under(directory: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in sorted(filenames))
    return found


def _nicopp_dataset(root: Path, class_names, contexts, images, skipped, layout) -> ScannedDataset:
    """A NICO++ tree (either layout): its contexts are the groups, and a prompt names the class in its context."""
    return ScannedDataset(
        name="nico++",
        root=root,
        class_names=class_names,
        groups=contexts,
        images=images,
        skipped=skipped,
        layout=layout,
        prompt_template="{class_name} in {group}",
    )


def _scan_files(files: list[tuple[Path, str, int, str | None]]) -> tuple[list[RealImage], list[SkippedFile]]:
    images: list[RealImage] = []
    skipped: list[SkippedFile] = []
    for path, rel, class_index, group in files:
        reason = check_image(path)
        if reason is None:
            images.append(RealImage(path=path, rel_path=rel, class_index=class_index, group=group))
        else:
            skipped.append(SkippedFile(path=path, reason=reason))
    return images, skipped


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------- NICO++


@dataclass
class NicoppFolderLayout(DatasetLayout):
    train_rel: str = NICOPP_TRAIN_DIR

    def synthetic_dir(self, dataset, class_index, group):
        return _join(self.train_rel, f"{group}/{dataset.class_names[class_index]}")


@dataclass
class NicoppMetadataLayout(DatasetLayout):
    base_rel: str = ""  # where metadata filenames are resolved, relative to the root
    other_rows: list[dict[str, str]] = field(default_factory=list)  # val/test rows, written back unchanged
    contexts: list[str] = field(default_factory=list)

    def synthetic_dir(self, dataset, class_index, group):
        return _join(self.base_rel, f"{group}/{dataset.class_names[class_index]}")

    def write_index(self, out, dataset, real, synthetic):
        rows = [
            {
                "filename": _strip_base(im.rel_path, self.base_rel),
                "y": im.class_index,
                "a": self.contexts.index(im.group),
                "split": 0,
            }
            for im in real
        ]
        rows += self.other_rows
        rows += [
            {
                "filename": _strip_base(im.rel_path, self.base_rel),
                "y": im.class_index,
                "a": self.contexts.index(im.group),
                "split": 0,
            }
            for im in synthetic
        ]
        _write_csv_atomic(out / "metadata.csv", ["filename", "y", "a", "split"], rows)
        return ["metadata.csv"]


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


def _strip_base(rel_path: str, base: str) -> str:
    return rel_path[len(base) + 1 :] if base and rel_path.startswith(base + "/") else rel_path


def _write_csv_atomic(path: Path, columns: list[str], rows: list[dict]) -> None:
    with atomic_writer(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _read_label_mapping(path: Path) -> list[str]:
    """dg_label_id_mapping.json: {"class": id} (or {"id": "class"}) to class names by id."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"{path} must be a JSON object mapping class names to ids")
    if all(isinstance(v, int) for v in mapping.values()):
        by_id = {int(v): str(k) for k, v in mapping.items()}
    elif all(str(k).isdigit() for k in mapping):
        by_id = {int(k): str(v) for k, v in mapping.items()}
    else:
        raise DatasetError(f"{path} must map class names to integer ids")
    if sorted(by_id) != list(range(len(by_id))):
        raise DatasetError(f"{path}: class ids must be 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def _ordered_contexts(found: set[str]) -> list[str]:
    known = packaged_lines("nicopp_contexts.txt")
    return known + sorted(found - set(known))


def read_nicopp(root: Path) -> ScannedDataset:
    """NICO++: SubpopBench metadata.csv when present, else the released track_1 folder layout."""
    root = _require_dir(root)
    if (root / "metadata.csv").is_file():
        return _read_nicopp_metadata(root)
    train_dir = None
    for rel in (NICOPP_TRAIN_DIR, "public_dg_0416/train", "train", ""):
        candidate = root / rel if rel else root
        if candidate.is_dir() and any((candidate / c).is_dir() for c in packaged_lines("nicopp_contexts.txt")):
            train_dir = candidate
            break
    if train_dir is None:
        raise DatasetError(
            f"{root} holds neither metadata.csv nor the NICO++ layout {NICOPP_TRAIN_DIR}/<context>/<class>/"
        )
    train_rel = _rel(train_dir, root) if train_dir != root else ""
    mapping_path = next(
        (
            p
            for p in (
                root / NICOPP_MAPPING,
                root / "dg_label_id_mapping.json",
                train_dir.parent.parent / "dg_label_id_mapping.json",
            )
            if p.is_file()
        ),
        None,
    )
    context_dirs = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    contexts = _ordered_contexts(set(context_dirs))
    if mapping_path is not None:
        class_names = _read_label_mapping(mapping_path)
    else:
        class_names = sorted({c.name for ctx in context_dirs for c in (train_dir / ctx).iterdir() if c.is_dir()})
    class_index = {name: i for i, name in enumerate(class_names)}
    files: list[tuple[Path, str, int, str | None]] = []
    skipped: list[SkippedFile] = []
    for context in context_dirs:
        for class_dir in sorted(p for p in (train_dir / context).iterdir() if p.is_dir()):
            if class_dir.name not in class_index:
                skipped.extend(SkippedFile(f, "class not in dg_label_id_mapping.json") for f in _files_under(class_dir))
                continue
            for path in _files_under(class_dir):
                files.append((path, _rel(path, root), class_index[class_dir.name], context))
    images, bad = _scan_files(files)
    layout = NicoppFolderLayout(train_rel=train_rel)
    if mapping_path is not None:
        layout.passthrough.append(
            (mapping_path, _rel(mapping_path, root) if mapping_path.is_relative_to(root) else mapping_path.name)
        )
    return _nicopp_dataset(root, class_names, contexts, images, skipped + bad, layout)


def _read_nicopp_metadata(root: Path) -> ScannedDataset:
    contexts = packaged_lines("nicopp_contexts.txt")
    mapping_path = next((p for p in (root / NICOPP_MAPPING, root / "dg_label_id_mapping.json") if p.is_file()), None)
    class_names = _read_label_mapping(mapping_path) if mapping_path else packaged_lines("nicopp_classes.txt")
    with open(root / "metadata.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"filename", "y", "a", "split"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{root / 'metadata.csv'} lacks columns {sorted(missing)} (expected filename,y,a,split)")
        rows = list(reader)
    base_rel = ""
    if rows:
        for candidate in ("", NICOPP_TRAIN_DIR, "public_dg_0416/train"):
            if ((root / candidate) / rows[0]["filename"]).exists():
                base_rel = candidate
                break
    base = root / base_rel if base_rel else root
    files: list[tuple[Path, str, int, str | None]] = []
    other_rows: list[dict[str, str]] = []
    passthrough: list[tuple[Path, str]] = []
    for number, row in enumerate(rows, start=2):
        try:
            y, a, split = int(row["y"]), int(row["a"]), int(row["split"])
        except ValueError as error:
            raise DatasetError(f"metadata.csv line {number}: y, a and split must be integers ({error})") from error
        if not (0 <= y < len(class_names)) or not (0 <= a < len(contexts)):
            raise DatasetError(
                f"metadata.csv line {number}: y={y} or a={a} out of range ({len(class_names)} classes, "
                f"{len(contexts)} contexts)"
            )
        path = base / row["filename"]
        rel = _join(base_rel, row["filename"])
        if split == 0:
            files.append((path, rel, y, contexts[a]))
        else:
            other_rows.append({"filename": row["filename"], "y": y, "a": a, "split": split})
            if path.is_file():
                passthrough.append((path, rel))
    images, skipped = _scan_files(files)
    layout = NicoppMetadataLayout(base_rel=base_rel, other_rows=other_rows, contexts=contexts)
    layout.passthrough = passthrough + ([(mapping_path, _rel(mapping_path, root))] if mapping_path else [])
    return _nicopp_dataset(root, class_names, contexts, images, skipped, layout)


# ---------------------------------------------------------------- ImageNet-LT

WNID = re.compile(r"^n\d{8}$")


@dataclass
class ImagenetLtLayout(DatasetLayout):
    split_file: str = "ImageNet_LT_train.txt"
    class_dirs: dict[int, str] = field(default_factory=dict)

    def synthetic_dir(self, dataset, class_index, group):
        return self.class_dirs.get(class_index, f"train/class_{class_index:04d}")

    def write_index(self, out, dataset, real, synthetic):
        lines = [f"{im.rel_path} {im.class_index}\n" for im in list(real) + list(synthetic)]
        write_atomic(out / self.split_file, "".join(lines))
        return [self.split_file]


def read_class_names(path: Path) -> tuple[list[str], list[str | None]]:
    """Class names by index from a text file (`name`, `<wnid> <name>` or `<index> <name>` per line)
    or a CSV with `name` (and optional `class_index`, `wnid`) columns. Returns (names, wnids)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"cannot read class-name file {path}: {error}") from error
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and "," in lines[0] and "name" in [c.strip() for c in lines[0].split(",")]:
        rows = list(csv.DictReader(lines))
        if "class_index" in rows[0]:
            rows.sort(key=lambda r: int(r["class_index"]))
        return [r["name"] for r in rows], [r.get("wnid") for r in rows]
    names: list[str] = []
    wnids: list[str | None] = []
    for number, line in enumerate(lines):
        head, _, rest = line.partition(" ")
        if WNID.match(head) and rest:
            names.append(rest.strip())
            wnids.append(head)
        elif head.isdigit() and rest and int(head) == number:
            names.append(rest.strip())
            wnids.append(None)
        else:
            names.append(line)
            wnids.append(None)
    return names, wnids


def read_imagenet_lt(
    root: Path, split_file: Path | None = None, class_names_file: Path | None = None
) -> ScannedDataset:
    """ImageNet-LT: `<relative path> <label>` split file plus class names (the packaged list by default)."""
    root = _require_dir(root)
    if split_file is None:
        split_file = next((root / n for n in ("ImageNet_LT_train.txt", "train.txt") if (root / n).is_file()), None)
        if split_file is None:
            raise DatasetError(f"no split file in {root} (ImageNet_LT_train.txt); name one with --split-file")
    elif not split_file.is_absolute() and not split_file.exists():
        split_file = root / split_file
    if not split_file.is_file():
        raise DatasetError(f"split file {split_file} does not exist")
    if class_names_file is None:
        class_names_file = next(
            (root / n for n in ("classnames.txt", "ImageNet_LT_classnames.txt") if (root / n).is_file()), None
        )
    names, wnids = read_class_names(class_names_file or packaged_path("imagenet_lt_train_counts.csv"))
    files: list[tuple[Path, str, int, str | None]] = []
    for number, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rel, _, label = line.strip().rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            raise DatasetError(f"{split_file.name} line {number}: expected '<path> <label>', got {line!r}")
        label_index = int(label)
        if not 0 <= label_index < len(names):
            raise DatasetError(
                f"{split_file.name} line {number}: label {label_index} outside the {len(names)} class names"
            )
        files.append((root / rel, rel, label_index, None))
    images, skipped = _scan_files(files)
    dir_votes: dict[int, Counter] = {}
    for im in images:
        dir_votes.setdefault(im.class_index, Counter())[im.rel_path.rpartition("/")[0]] += 1
    class_dirs = {c: votes.most_common(1)[0][0] for c, votes in dir_votes.items()}
    for c, wnid in enumerate(wnids):
        if c not in class_dirs and wnid:
            class_dirs[c] = f"train/{wnid}"
    layout = ImagenetLtLayout(split_file=split_file.name, class_dirs=class_dirs)
    for other in sorted(root.glob("*.txt")):
        if other != split_file:
            layout.passthrough.append((other, other.name))
    return ScannedDataset(
        name="imagenet-lt", root=root, class_names=names, groups=None, images=images, skipped=skipped, layout=layout
    )


# ---------------------------------------------------------------- ImageFolder


@dataclass
class ImageFolderLayout(DatasetLayout):
    base_rel: str = ""
    groups_file: str | None = None

    def synthetic_dir(self, dataset, class_index, group):
        return _join(self.base_rel, dataset.class_names[class_index])

    def write_index(self, out, dataset, real, synthetic):
        if self.groups_file is None:
            return []
        rows = [
            {"path": _strip_base(im.rel_path, self.base_rel), "group": im.group} for im in list(real) + list(synthetic)
        ]
        _write_csv_atomic(out / self.groups_file, ["path", "group"], rows)
        return [self.groups_file]


def read_imagefolder(
    root: Path, groups_csv: Path | None = None, base_rel: str = "", name: str = "imagefolder"
) -> ScannedDataset:
    """torchvision ImageFolder layout `<root>/<class>/**`; optional groups from a CSV with columns path,group."""
    root = _require_dir(root)
    base = root / base_rel if base_rel else root
    _require_dir(base)
    class_names = sorted(e.name for e in os.scandir(base) if e.is_dir())
    if not class_names:
        raise DatasetError(f"{base} has no class folders (<root>/<class>/<image>)")
    group_of: dict[str, str] | None = None
    if groups_csv is not None:
        group_of = _read_groups_csv(groups_csv)
    files: list[tuple[Path, str, int, str | None]] = []
    missing_group = 0
    for index, class_name in enumerate(class_names):
        for path in _files_under(base / class_name):
            rel_in_base = _rel(path, base)
            group = None
            if group_of is not None:
                group = group_of.get(rel_in_base)
                if group is None:
                    missing_group += 1
                    continue
            files.append((path, _rel(path, root), index, group))
    if missing_group:
        raise DatasetError(f"{groups_csv}: {missing_group} images have no group row (paths relative to {base})")
    images, skipped = _scan_files(files)
    groups = sorted({g for g in group_of.values()}) if group_of is not None else None
    layout = ImageFolderLayout(base_rel=base_rel, groups_file=groups_csv.name if groups_csv else None)
    return ScannedDataset(
        name=name,
        root=root,
        class_names=class_names,
        groups=groups,
        images=images,
        skipped=skipped,
        layout=layout,
        prompt_template="{class_name} in {group}" if groups else "{class_name}",
    )


def _read_groups_csv(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"path", "group"} <= set(reader.fieldnames or []):
                raise DatasetError(f"{path} must have columns path,group")
            return {row["path"]: row["group"] for row in reader}
    except OSError as error:
        raise DatasetError(f"cannot read groups file {path}: {error}") from error


# ---------------------------------------------------------------- Digits-LT


@dataclass
class DigitsLtLayout(ImageFolderLayout):
    pass


def read_digits_lt(root: Path) -> ScannedDataset:
    """Digits-LT as fgs_client.digits_lt writes it: `<root>/train/<class>/*.png` plus digits_lt.json."""
    root = _require_dir(root)
    description_path = root / DIGITS_LT_METADATA
    if not description_path.is_file():
        raise DatasetError(f"{root} has no {DIGITS_LT_METADATA}; build the set with fgs_client.digits_lt first")
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DatasetError(f"{description_path} is not valid JSON: {error}") from error
    dataset = read_imagefolder(root, base_rel="train", name="digits-lt")
    names, prompts = _digits_classes(description)
    if names:
        if sorted(names) != sorted(dataset.class_names) and not set(dataset.class_names) <= set(names):
            raise DatasetError(f"{DIGITS_LT_METADATA} names classes {names}, but train/ holds {dataset.class_names}")
        remap = {old: names.index(n) for old, n in enumerate(dataset.class_names)}
        dataset.images = [RealImage(im.path, im.rel_path, remap[im.class_index], None) for im in dataset.images]
        dataset.class_names = names
    dataset.prompt_template = "a handwritten digit {class_name}"
    if prompts:
        dataset.class_prompts = prompts
    layout = DigitsLtLayout(base_rel="train")
    layout.passthrough.append((description_path, DIGITS_LT_METADATA))
    for part in ("validation", "test"):
        if (root / part).is_dir():
            layout.passthrough.extend((p, _rel(p, root)) for p in _files_under(root / part))
    dataset.layout = layout
    return dataset


def _digits_classes(description: dict) -> tuple[list[str], list[str]]:
    classes = description.get("classes") or description.get("class_names") or []
    names: list[str] = []
    prompts: list[str] = []
    for item in classes:
        if isinstance(item, dict):
            names.append(str(item.get("name")))
            if item.get("prompt"):
                prompts.append(str(item["prompt"]))
        else:
            names.append(str(item))
    raw_prompts = description.get("prompts")
    if isinstance(raw_prompts, list) and len(raw_prompts) == len(names):
        prompts = [str(p) for p in raw_prompts]
    elif isinstance(raw_prompts, dict):
        prompts = [str(raw_prompts.get(n, f"a handwritten digit {n}")) for n in names]
    if len(prompts) != len(names):
        prompts = []
    return names, prompts


# ---------------------------------------------------------------- prompts

PROMPT_FIELDS = ("class_name", "group")


def check_prompt_template(template: str) -> str:
    """A prompt template names {class_name} (and {group} for grouped datasets) and no other field."""
    try:
        fields_ = {name for _text, name, _spec, _conv in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise DatasetError(f"--prompt-template {template!r} is not a valid template: {error}") from None
    unknown = fields_ - set(PROMPT_FIELDS)
    if unknown or "class_name" not in fields_:
        raise DatasetError(
            f"--prompt-template {template!r} must contain {{class_name}} and may contain {{group}}; "
            f"it names {sorted(unknown) or 'no {class_name}'}"
        )
    return template


def read_prompts_file(path: Path, class_names: list[str]) -> list[str]:
    """A prompt per class from a JSON object {"class": "prompt"} or a CSV with columns class,prompt (a spreadsheet's
    UTF-8 byte-order mark is allowed); every class of the dataset must have one, and every named class must be one
    of the dataset's. A name that several classes share (ImageNet-LT's two "crane") cannot say which it means: the
    file keys those classes as `<class index>-<name>` ("134-crane"), the folder names of `class-folders`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise DatasetError(f"cannot read the prompts file {path}: {error}") from error
    if text.lstrip().startswith("{"):
        try:
            by_class = json.loads(text)
        except ValueError as error:
            raise DatasetError(f"prompts file {path} is not valid JSON: {error}") from error
    else:
        reader = csv.DictReader(text.splitlines())
        if not {"class", "prompt"} <= set(reader.fieldnames or []):
            raise DatasetError(f"prompts file {path} must be a JSON object or a CSV with columns class,prompt")
        by_class = {row["class"]: row["prompt"] for row in reader}
    if not isinstance(by_class, dict) or not all(isinstance(v, str) and v.strip() for v in by_class.values()):
        raise DatasetError(f"prompts file {path} must map each class name to a non-empty prompt")
    repeated = {name for name in class_names if class_names.count(name) > 1}
    width = len(str(len(class_names) - 1))
    keys = [
        (f"{c}-{name}", f"{c:0{width}d}-{name}") if name in repeated else (name,) for c, name in enumerate(class_names)
    ]
    problems = []
    if ambiguous := sorted(set(by_class) & repeated):
        where = {name: [c for c, n in enumerate(class_names) if n == name] for name in ambiguous}
        problems.append(
            "these names belong to more than one class, key each as <class index>-<name>: "
            + "; ".join(f"{name} (classes {', '.join(map(str, where[name]))})" for name in ambiguous)
        )
    known = {key for forms in keys for key in forms}
    if unknown := sorted(set(by_class) - known - repeated):
        problems.append(f"no such class {unknown}")
    if missing := [forms[0] for forms in keys if not any(key in by_class for key in forms)]:
        problems.append(f"no prompt for {missing}")
    if problems:
        raise DatasetError(f"prompts file {path} does not match the dataset's classes: {'; '.join(problems)}")
    return [next(by_class[key] for key in forms if key in by_class) for forms in keys]


def apply_prompts(dataset: ScannedDataset, template: str | None = None, prompts_file: Path | None = None) -> None:
    """Use a prompt template or a class -> prompt file instead of the reader's own prompts."""
    if template is not None and prompts_file is not None:
        raise DatasetError("give --prompt-template or --prompts, not both")
    if template is not None:
        dataset.prompt_template = check_prompt_template(template)
        dataset.class_prompts = None
    if prompts_file is not None:
        dataset.class_prompts = read_prompts_file(prompts_file, dataset.class_names)


def read_dataset(
    name: str,
    root: Path,
    *,
    split_file: Path | None = None,
    class_names_file: Path | None = None,
    groups_csv: Path | None = None,
    prompt_template: str | None = None,
    prompts_file: Path | None = None,
) -> ScannedDataset:
    """Read a dataset by its name (one of DATASET_NAMES); a prompt template or prompts file replaces the reader's
    own prompts (the class name, or `class in group`). Paths may be given as strings."""
    root = Path(root)
    split_file, class_names_file, groups_csv, prompts_file = (
        None if path is None else Path(path) for path in (split_file, class_names_file, groups_csv, prompts_file)
    )
    if name == "nico++":
        dataset = read_nicopp(root)
    elif name == "imagenet-lt":
        dataset = read_imagenet_lt(root, split_file=split_file, class_names_file=class_names_file)
    elif name == "imagefolder":
        dataset = read_imagefolder(root, groups_csv=groups_csv)
    elif name == "digits-lt":
        dataset = read_digits_lt(root)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    apply_prompts(dataset, prompt_template, prompts_file)
    return dataset
