"""The balance plan: per class (or class x group), how many images to add to reach the target,
and how the generation jobs are cut and conditioned.

Target conventions:
- `max`: every unit up to the largest unit's count (the paper: 811 per NICO++ group, ImageNet-LT to its largest class);
- a number: every unit up to that total (the paper's ImageNet-LT setting is 1,300);
- a JSON object of per-unit totals, imbalanced-learn's `sampling_strategy` dict convention: keys are class names
  (or class indices), `class/group` for grouped datasets; units not named get nothing; a total below the current
  count is an error (over-sampling never removes images);
- imbalanced-learn's other `sampling_strategy` forms for over-samplers: `not majority` (= `auto`), `all`,
  `minority` (only the smallest unit), `not minority` (all but the smallest) up to the largest unit's count, and a
  ratio r in (0, 1] of the largest unit's count (every unit up to ceil(r x largest); imbalanced-learn allows a
  float for two classes only, here it applies to each unit).
Images to add per unit = max(0, target - count). For ImageNet-LT at 1,300 that is 1,184,154 (every class is below 1,300,
so each class gets at least 20).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from fgs_client.dataset_readers import RealImage, ScannedDataset
from fgs_common.exceptions import UserInputError

Unit = tuple[int, "str | None"]


class PlanError(UserInputError):
    """The target or the counts cannot make a plan."""


class ConditioningSource(str, Enum):
    own = "own images"  # random real images of the same class (and group)
    other_groups = (
        "other groups"  # the group has no real image: random real images of the class in other groups (paper J.2)
    )
    text = "text only"  # the class has no real image at all: the prompt alone


@dataclass(frozen=True)
class PlanEntry:
    class_index: int
    class_name: str
    group: str | None
    before: int
    to_add: int
    conditioning: ConditioningSource

    @property
    def after(self) -> int:
        return self.before + self.to_add

    @property
    def key(self) -> str:
        return f"{self.class_index}/{self.group}" if self.group is not None else str(self.class_index)

    @property
    def label(self) -> str:
        return f"{self.class_name}/{self.group}" if self.group is not None else self.class_name


@dataclass(frozen=True)
class BalancePlan:
    entries: list[PlanEntry]
    images_per_job: int

    @property
    def total_before(self) -> int:
        return sum(e.before for e in self.entries)

    @property
    def total_to_add(self) -> int:
        return sum(e.to_add for e in self.entries)

    @property
    def job_count(self) -> int:
        return sum(-(-e.to_add // self.images_per_job) for e in self.entries)


@dataclass(frozen=True)
class UnitCounts:
    """Real-image counts per unit, from a scanned dataset or a counts CSV (for a dry run without the images)."""

    class_names: list[str]
    groups: list[str] | None
    counts: dict[Unit, int]

    @classmethod
    def from_dataset(cls, dataset: ScannedDataset) -> UnitCounts:
        return cls(class_names=dataset.class_names, groups=dataset.groups, counts=dataset.unit_counts())


def read_counts_csv(path: Path) -> UnitCounts:
    """Counts CSV: `name` (or `class`), a count column (`train_count` or `count`), optional `class_index`
    and `group`."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise PlanError(f"cannot read counts file {path}: {error}") from error
    if not rows:
        raise PlanError(f"counts file {path} has no rows")
    columns = set(rows[0])
    name_col = next((c for c in ("name", "class") if c in columns), None)
    count_col = next((c for c in ("train_count", "count") if c in columns), None)
    if name_col is None or count_col is None:
        raise PlanError(f"counts file {path} needs a name (or class) column and a train_count (or count) column")
    has_group = "group" in columns
    if "class_index" in columns:
        rows.sort(key=lambda r: int(r["class_index"]))
    class_names: list[str] = []
    class_of: dict[str, int] = {}  # class identity (its index when given: ImageNet has duplicate names) -> position
    groups: list[str] = []
    counts: dict[Unit, int] = {}
    for row in rows:
        name = row[name_col]
        identity = row["class_index"] if "class_index" in columns else name
        if identity not in class_of:
            class_of[identity] = len(class_names)
            class_names.append(name)
        group = row["group"] if has_group else None
        if group is not None and group not in groups:
            groups.append(group)
        try:
            count = int(row[count_col])
        except ValueError as error:
            raise PlanError(f"counts file {path}: count {row[count_col]!r} of {name!r} is not an integer") from error
        unit = (class_of[identity], group)
        if unit in counts:
            raise PlanError(f"counts file {path} lists {name!r}{'/' + group if group else ''} twice")
        counts[unit] = count
    if has_group:  # units absent from the file have no image
        for c in range(len(class_names)):
            for g in groups:
                counts.setdefault((c, g), 0)
    return UnitCounts(class_names=class_names, groups=groups if has_group else None, counts=counts)


# imbalanced-learn's sampling_strategy strings for over-samplers ("auto" is its name for "not majority"); "max"
# is ours (every unit up to the largest), which "not majority" and "all" equal when nothing is removed.
IMBLEARN_STRATEGIES = ("not majority", "auto", "all", "minority", "not minority")


def parse_target(text: str) -> str | int | float | dict[str, int]:
    """`max`, a positive integer, an imbalanced-learn strategy or ratio, a JSON object, or @FILE / a path to a JSON
    file of per-unit totals."""
    text = text.strip()
    if text == "max" or text in IMBLEARN_STRATEGIES:
        return text
    if text.isdigit():
        return int(text)
    try:
        ratio = float(text)
    except ValueError:
        pass
    else:
        if not 0.0 < ratio <= 1.0:
            raise PlanError(f"--target ratio {text} must lie in (0, 1]: a fraction of the largest class's count")
        return ratio
    source = text
    path = Path(text[1:] if text.startswith("@") else text)
    if not text.startswith("{"):
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as error:
            raise PlanError(
                f"--target must be 'max', a number, a JSON object or a JSON file; cannot read {path}: {error}"
            ) from error
    try:
        totals = json.loads(source)
    except ValueError as error:
        raise PlanError(f"--target JSON is invalid: {error}") from error
    if not isinstance(totals, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in totals.values()
    ):
        raise PlanError("--target JSON must be an object of per-class totals (non-negative integers)")
    return {str(k): v for k, v in totals.items()}


def plan_balance(
    counts: UnitCounts, target: str | int | float | dict[str, int], images_per_job: int = 8
) -> BalancePlan:
    """Per unit, how many images to add to reach the target."""
    if images_per_job < 1:
        raise PlanError("images per job must be at least 1")
    units = list(counts.counts)
    totals = _target_totals(counts, target)
    class_has_real = {c for (c, _g), n in counts.counts.items() if n > 0}
    entries = []
    for unit in units:
        class_index, group = unit
        before = counts.counts[unit]
        wanted = totals.get(unit, before)
        if wanted < before:
            name = counts.class_names[class_index] + (f"/{group}" if group is not None else "")
            raise PlanError(
                f"target {wanted} for {name!r} is below its {before} real images (over-sampling never removes images)"
            )
        if before > 0:
            source = ConditioningSource.own
        elif class_index in class_has_real:
            source = ConditioningSource.other_groups
        else:
            source = ConditioningSource.text
        entries.append(PlanEntry(class_index, counts.class_names[class_index], group, before, wanted - before, source))
    return BalancePlan(entries=entries, images_per_job=images_per_job)


def _target_totals(counts: UnitCounts, target: str | int | float | dict[str, int]) -> dict[Unit, int]:
    top = max(counts.counts.values(), default=0)
    if target in ("max", "not majority", "auto", "all"):
        return {unit: max(top, n) for unit, n in counts.counts.items()}
    if target in ("minority", "not minority"):
        smallest = min(counts.counts, key=counts.counts.get)  # the first of the smallest, as imbalanced-learn
        chosen = {smallest} if target == "minority" else set(counts.counts) - {smallest}
        return {unit: max(top, n) if unit in chosen else n for unit, n in counts.counts.items()}
    if isinstance(target, float):
        wanted = math.ceil(target * top)
        return {unit: max(wanted, n) for unit, n in counts.counts.items()}
    if isinstance(target, int):
        if target < 1:
            raise PlanError("--target must be at least 1")
        return {unit: max(target, n) for unit, n in counts.counts.items()}
    if not isinstance(target, dict):
        raise PlanError(
            f"--target {target!r} is neither 'max', a number, a ratio, one of {IMBLEARN_STRATEGIES} "
            "nor per-class totals"
        )
    by_name: dict[str, Unit] = {}
    for unit in counts.counts:
        class_index, group = unit
        name = counts.class_names[class_index]
        if group is None:
            by_name[name] = unit
            by_name[str(class_index)] = unit
        else:
            by_name[f"{name}/{group}"] = unit
            by_name[f"{class_index}/{group}"] = unit
    totals: dict[Unit, int] = {}
    for key, total in target.items():
        if key not in by_name:
            hint = "class/group" if counts.groups is not None else "class name or index"
            raise PlanError(f"--target names {key!r}, which is no unit of this dataset (keys are {hint})")
        totals[by_name[key]] = total
    return totals


# ---------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobSlot:
    """One generation job of the plan: a fixed place (entry, index) with fixed seeds and conditioning picks,
    so a rerun rebuilds exactly the same job."""

    key: str  # "<entry key>/<job index>"
    entry: PlanEntry
    job_index: int
    num_images: int
    seed: int
    prompt: str
    conditioning: tuple[RealImage, ...]  # one per image, or empty (text only)

    @property
    def file_stem(self) -> str:
        group = f"_{_slug(self.entry.group)}" if self.entry.group is not None else ""
        return f"fgs_c{self.entry.class_index}{group}_j{self.job_index:05d}"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)


def derived_int(*parts: object, bits: int = 62) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)


def build_jobs(plan: BalancePlan, dataset: ScannedDataset, seed: int = 0) -> list[JobSlot]:
    """Cut each entry into jobs of at most plan.images_per_job images, with seeded conditioning picks."""
    by_group: dict[Unit, list[RealImage]] = {}
    by_class: dict[int, list[RealImage]] = {}
    for image in sorted(dataset.images, key=lambda im: im.rel_path):
        by_group.setdefault((image.class_index, image.group), []).append(image)
        by_class.setdefault(image.class_index, []).append(image)
    slots: list[JobSlot] = []
    for entry in plan.entries:
        if entry.conditioning is ConditioningSource.own:
            pool = by_group.get((entry.class_index, entry.group), [])
        elif entry.conditioning is ConditioningSource.other_groups:
            pool = [im for im in by_class.get(entry.class_index, []) if im.group != entry.group]
        else:
            pool = []
        prompt = dataset.prompt(entry.class_index, entry.group)
        remaining = entry.to_add
        job_index = 0
        while remaining > 0:
            n = min(plan.images_per_job, remaining)
            key = f"{entry.key}/{job_index}"
            rng = random.Random(derived_int(seed, "conditioning", key))
            picks = tuple(rng.choice(pool) for _ in range(n)) if pool else ()
            slots.append(JobSlot(key, entry, job_index, n, derived_int(seed, "seed", key), prompt, picks))
            remaining -= n
            job_index += 1
    return slots
