"""Checks before any job is submitted: does the classifier know the dataset's classes, in which order, and does
it recognise the user's own training images through the preprocessing the workers apply?

Mistakes these catch pass every upload check, because an archive that runs on random tensors can still be fed
the wrong classes (a spec in another order) or the wrong pixels (a wrong mean/std, input size or channel order).
No torch here: the accuracy pre-flight imports `fgs_client.training` (the train extra) only when it runs.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fgs_client.dataset_readers import ScannedDataset
from fgs_common.exceptions import UserInputError
from fgs_common.wire import ClassifierSpec

# Training images per class the pre-flight scores. 20 is the Few-shot boundary (fewer than 20 training images),
# so every class contributes all it has up to the point where classes count as Medium; 200 images for 10 classes
# take about a second on a CPU.
PREFLIGHT_IMAGES_PER_CLASS = 20
# At most this many in all, so that the check does not grow with the class count (ImageNet-LT at 20 a class would
# score 20,000 images): at 2,000 the accuracy's standard error is at most 0.5 / sqrt(2000) = 1.1 points, far
# below the distance between a working spec (near 100 % on its own training images) and the threshold (>= 50 %).
PREFLIGHT_MAX_IMAGES = 2000


def preflight_threshold(num_classes: int) -> float:
    """Halfway between chance (1/K) and perfect: 0.55 for 10 classes, 0.75 for 2.

    The pre-flight scores a classifier on images it was trained on, where one fgs can steer with is near perfect;
    a wrong mean/std, input size or channel order pushes it towards chance or towards one class for every image.
    Halfway keeps both cases apart for any class count (a 2-class classifier at 0.6 is barely above a coin).
    """
    return (1.0 + 1.0 / num_classes) / 2.0


@dataclass(frozen=True)
class ClassMatch:
    """The classifier's output index of each dataset class, and what the client should tell the user."""

    classifier_index: list[int]  # dataset class index -> classifier class index
    note: str | None  # None: same classes in the same order


def match_classes(spec: ClassifierSpec, dataset_classes: list[str]) -> ClassMatch:
    """Line the classifier's classes up with the dataset's by name; a UserInputError when they are not the same set,
    or when they differ in order and a name repeats (two classes of one name cannot be told apart by name)."""
    if spec.class_names is None:
        if spec.num_classes != len(dataset_classes):
            raise UserInputError(
                f"the classifier has {spec.num_classes} classes but the dataset {len(dataset_classes)} "
                f"({_some(dataset_classes)}); its spec names no classes, so they cannot be matched"
            )
        return ClassMatch(
            list(range(len(dataset_classes))),
            "the classifier spec has no class_names: its output i is taken to be the dataset's class i "
            f"({_some(dataset_classes)}); add class_names to the spec to have this checked",
        )
    if spec.class_names == dataset_classes:
        # Identical lists match position by position, repeated names too (ImageNet has two "crane" classes).
        return ClassMatch(list(range(len(dataset_classes))), None)
    if sorted(spec.class_names) != sorted(dataset_classes):
        raise UserInputError(
            "the classifier's classes are not the dataset's" + _difference(spec.class_names, dataset_classes)
        )
    repeated = sorted({name for name in dataset_classes if dataset_classes.count(name) > 1})
    if repeated:
        raise UserInputError(
            "the classifier lists the dataset's classes in another order, and these names belong to more than one "
            f"class, so matching by name cannot tell which is which: {_some(repeated)}. List class_names in the "
            "spec in the classifier's output order with the dataset's classes in that same order"
        )
    position = {name: i for i, name in enumerate(spec.class_names)}
    index = [position[name] for name in dataset_classes]
    pairs = list(enumerate(zip(dataset_classes, index, strict=True)))
    moved = [f"{name} -> {i}" for c, (name, i) in pairs if c != i]
    kept = [f"{name} {i}" for c, (name, i) in pairs if c == i]
    return ClassMatch(
        index,
        "the classifier lists the dataset's classes in another order; mapped by name (dataset class -> classifier "
        f"output): {_some(moved)}" + (f"; at the same index in both: {_some(kept)}" if kept else ""),
    )


# Names an error or note lists before it only counts the rest: ImageNet has 1,000 classes, iNaturalist 8,142.
SHOWN_NAMES = 20


def _some(names: list[str]) -> str:
    shown = ", ".join(str(name) for name in names[:SHOWN_NAMES])
    more = len(names) - SHOWN_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _difference(spec_names: list[str], dataset_classes: list[str]) -> str:
    """The names on one side only (first SHOWN_NAMES of each, and how many), and names counted differently."""
    spec_counts, data_counts = Counter(spec_names), Counter(dataset_classes)
    only_spec = sorted(set(spec_counts) - set(data_counts))
    only_data = sorted(set(data_counts) - set(spec_counts))
    parts = []
    if only_spec:
        parts.append(f"only in the spec ({len(only_spec)}): {_some(only_spec)}")
    if only_data:
        parts.append(f"only in the dataset ({len(only_data)}): {_some(only_data)}")
    counted = sorted(name for name in set(spec_counts) & set(data_counts) if spec_counts[name] != data_counts[name])
    if counted:
        parts.append(
            "named a different number of times: "
            + _some(
                [f"{name} ({spec_counts[name]} in the spec, {data_counts[name]} in the dataset)" for name in counted]
            )
        )
    return " (" + "; ".join(parts) + ")"


@dataclass(frozen=True)
class PreflightResult:
    accuracy: float
    images: int
    threshold: float
    per_class: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.threshold

    def summary(self) -> str:
        worst = sorted(self.per_class.items(), key=lambda item: item[1])[:3]
        return (
            f"pre-flight: the classifier recognises {self.accuracy:.0%} of {self.images} of your training images "
            f"(threshold {self.threshold:.0%}; weakest classes: "
            + ", ".join(f"{name} {value:.0%}" for name, value in worst)
            + ")"
        )

    def refusal(self) -> str:
        return (
            f"{self.summary()}. The feedback would steer towards what it mistakes. Likely causes: the spec's mean/std "
            "are not the ones it was trained with (fgs hands it pixels in [0, 1], then subtracts mean and divides by "
            "std), its input_size or in_channels differ from training, or it was trained on BGR images (fgs sends "
            "RGB). Fix the spec, or pass --force to run anyway."
        )


def sample_images(
    dataset: ScannedDataset, per_class: int, seed: int = 0, max_images: int = PREFLIGHT_MAX_IMAGES
) -> list[tuple[Path, int]]:
    """Up to per_class training images of each class, fewer per class when the classes are many, and at most
    max_images in all, picked with a fixed seed: (file, dataset class index)."""
    by_class: dict[int, list[Path]] = {}
    for image in sorted(dataset.images, key=lambda im: im.rel_path):
        by_class.setdefault(image.class_index, []).append(image.path)
    per_class = max(1, min(per_class, max_images // max(1, len(by_class))))
    rng = random.Random(seed)
    picked: list[tuple[Path, int]] = []
    for class_index, paths in sorted(by_class.items()):
        picked.extend((path, class_index) for path in rng.sample(paths, min(per_class, len(paths))))
    if len(picked) > max_images:  # more classes than max_images: one image of a random subset of them
        picked = sorted(rng.sample(picked, max_images), key=lambda pick: pick[1])
    return picked


def run_preflight(
    archive: Path, spec: ClassifierSpec, dataset: ScannedDataset, match: ClassMatch
) -> PreflightResult | None:
    """Score the classifier archive on a sample of the user's training images (`sample_images`) through the
    workers' own loading and preprocessing (`fgs_classifier.registry`, `LoadedClassifier.preprocess`); None when
    torch (the train extra) is not installed."""
    try:
        from fgs_client.training import classify_images, load_classifier_archive
    except ImportError:
        return None
    sample = sample_images(dataset, PREFLIGHT_IMAGES_PER_CLASS)
    predicted = classify_images(load_classifier_archive(archive, spec), [path for path, _ in sample])
    hits: dict[int, list[bool]] = {}
    for (_, class_index), guess in zip(sample, predicted, strict=True):
        hits.setdefault(class_index, []).append(guess == match.classifier_index[class_index])
    correct = sum(sum(values) for values in hits.values())
    return PreflightResult(
        accuracy=correct / len(sample),
        images=len(sample),
        threshold=preflight_threshold(spec.num_classes),
        per_class={dataset.class_names[c]: sum(v) / len(v) for c, v in hits.items()},
    )
