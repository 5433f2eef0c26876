"""Checks before any job is submitted: does the classifier know the dataset's classes, in which order, and does
it recognise the user's own training images through the preprocessing the workers apply?

Mistakes these catch pass every upload check, because an archive that runs on random tensors can still be fed
the wrong classes (a spec in another order) or the wrong pixels (a wrong mean/std, input size or channel order).
No torch here: the accuracy pre-flight imports `fgs_client.training` (the train extra) only when it runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from fgs_client.dataset_readers import ScannedDataset
from fgs_common.wire import ClassifierSpec

# Training images per class the pre-flight scores. 20 is the Few-shot boundary (fewer than 20 training images),
# so every class contributes all it has up to the point where classes count as Medium; 200 images for 10 classes
# take about a second on a CPU.
PREFLIGHT_IMAGES_PER_CLASS = 20


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
    """Line the classifier's classes up with the dataset's by name; a ValueError when they are not the same set."""
    if spec.class_names is None:
        if spec.num_classes != len(dataset_classes):
            raise ValueError(
                f"the classifier has {spec.num_classes} classes but the dataset {len(dataset_classes)} "
                f"({dataset_classes}); its spec names no classes, so they cannot be matched"
            )
        return ClassMatch(
            list(range(len(dataset_classes))),
            "the classifier spec has no class_names: its output i is taken to be the dataset's class i "
            f"({', '.join(dataset_classes)}); add class_names to the spec to have this checked",
        )
    if sorted(spec.class_names) != sorted(dataset_classes):
        raise ValueError(
            "the classifier's classes are not the dataset's: the spec's class_names are "
            f"{spec.class_names}, the dataset's classes {dataset_classes}"
            + _difference(spec.class_names, dataset_classes)
        )
    index = [spec.class_names.index(name) for name in dataset_classes]
    if index == list(range(len(dataset_classes))):
        return ClassMatch(index, None)
    moved = [f"{name} -> {i}" for c, (name, i) in enumerate(zip(dataset_classes, index, strict=True)) if c != i]
    return ClassMatch(
        index,
        "the classifier lists the dataset's classes in another order; mapped by name (dataset class -> classifier "
        f"output): {', '.join(moved)}",
    )


def _difference(spec_names: list[str], dataset_classes: list[str]) -> str:
    only_spec = sorted(set(spec_names) - set(dataset_classes))
    only_data = sorted(set(dataset_classes) - set(spec_names))
    return f" (only in the spec: {only_spec}; only in the dataset: {only_data})"


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


def sample_images(dataset: ScannedDataset, per_class: int, seed: int = 0) -> list[tuple[Path, int]]:
    """Up to per_class training images of each class, picked with a fixed seed: (file, dataset class index)."""
    by_class: dict[int, list[Path]] = {}
    for image in sorted(dataset.images, key=lambda im: im.rel_path):
        by_class.setdefault(image.class_index, []).append(image.path)
    rng = random.Random(seed)
    picked: list[tuple[Path, int]] = []
    for class_index, paths in sorted(by_class.items()):
        picked.extend((path, class_index) for path in rng.sample(paths, min(per_class, len(paths))))
    return picked


def run_preflight(
    archive: Path, spec: ClassifierSpec, dataset: ScannedDataset, match: ClassMatch
) -> PreflightResult | None:
    """Score the classifier archive on a sample of the user's training images through the workers' own loading
    and preprocessing (`fgs_classifier.registry`); None when torch (the train extra) is not installed."""
    try:
        from fgs_client.training import classify_images, load_classifier_archive
    except ImportError:
        return None
    sample = sample_images(dataset, PREFLIGHT_IMAGES_PER_CLASS)
    predicted = classify_images(load_classifier_archive(archive, spec), [path for path, _ in sample])
    hits: dict[int, list[bool]] = {}
    for (_path, class_index), guess in zip(sample, predicted, strict=True):
        hits.setdefault(class_index, []).append(guess == match.classifier_index[class_index])
    correct = sum(sum(values) for values in hits.values())
    return PreflightResult(
        accuracy=correct / len(sample),
        images=len(sample),
        threshold=preflight_threshold(spec.num_classes),
        per_class={dataset.class_names[c]: sum(v) / len(v) for c, v in hits.items()},
    )
