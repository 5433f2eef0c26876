"""Checks before any job is submitted: does the classifier know the dataset's classes, in which order, and does
it recognise the user's own training images through the preprocessing the workers apply?

Mistakes these catch pass every upload check, because an archive that runs on random tensors can still be fed
the wrong classes (a spec in another order) or the wrong pixels (a wrong mean/std, input size or channel order).
No torch here: the accuracy pre-flight imports `fgs_client.training` (the train extra) only when it runs.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
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


# A classifier that fgs can steer with is near perfect on its own training images; below this it is almost always
# fed wrongly (issue 23: a 0.5/0.5 spec on a classifier trained with 0.311/0.350 scored 76 %, the right spec 100 %).
# Below it the pre-flight tries the common alternatives, and warns loudly when none does clearly better.
WELL_FED_ACCURACY = 0.90
# "Clearly better": at least 10 points more and at least 3 more images right. 10 points is 2.3 standard errors of
# an accuracy near 76 % on 116 images (the case), and 3 images keep a tiny sample from naming a cause on
# the strength of one image.
CLEARLY_BETTER_POINTS = 0.10
CLEARLY_BETTER_IMAGES = 3
# The statistics torchvision's ImageNet models are trained with (torchvision.models weights' transforms).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Feeding:
    """One way of feeding the classifier the user's images: a spec (mean/std, input size, channels) and the
    channel order; `fix` says what the user should change when it is the one that works."""

    spec: ClassifierSpec
    label: str
    fix: str
    swap_channels: bool = False

    def same_as(self, other: Feeding) -> bool:
        return self.swap_channels == other.swap_channels and _spec_key(self.spec) == _spec_key(other.spec)


@dataclass(frozen=True)
class Alternative:
    label: str
    fix: str
    accuracy: float


@dataclass(frozen=True)
class PreflightResult:
    accuracy: float
    images: int
    threshold: float
    per_class: dict[str, float]
    better: Alternative | None = None  # a feeding (or class order) that scores clearly better than the spec's
    tried: tuple[Alternative, ...] = ()  # every alternative scored (only when the spec's is below WELL_FED_ACCURACY)
    class_order_note: str | None = None  # how the dataset's classes were lined up with the classifier's

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.threshold and self.better is None

    @property
    def well_fed(self) -> bool:
        return self.accuracy >= WELL_FED_ACCURACY

    def summary(self) -> str:
        worst = sorted(self.per_class.items(), key=lambda item: item[1])[:3]
        return (
            f"pre-flight: the classifier recognises {self.accuracy:.0%} of {self.images} of your training images "
            f"(threshold {self.threshold:.0%}; weakest classes: "
            + ", ".join(f"{name} {value:.0%}" for name, value in worst)
            + ")"
        )

    def _tried(self) -> str:
        others = [a for a in self.tried if a is not self.better]
        if not others:
            return ""
        return " Also tried: " + "; ".join(f"{a.label} {a.accuracy:.0%}" for a in others) + "."

    def warning(self) -> str:
        """What the client says when the spec passes the threshold yet stays below WELL_FED_ACCURACY."""
        return (
            f"{self.summary()}. A classifier scores near 100 % on its own training images when it is fed as it was "
            f"trained; below {WELL_FED_ACCURACY:.0%} the feedback steers partly towards its mistakes, and no common "
            "alternative (mean/std, channel order, input size, channels) did clearly better." + self._tried()
        )

    def refusal(self) -> str:
        if self.better is not None:
            return (
                f"{self.summary()}. With {self.better.label} this classifier scores {self.better.accuracy:.0%} "
                f"instead of {self.accuracy:.0%}: {self.better.fix}.{self._tried()} Fix the spec, or pass --force "
                "to run anyway."
            )
        causes = (
            "the spec's mean/std are not the ones it was trained with (fgs hands it pixels in [0, 1], then "
            "subtracts mean and divides by std), its input_size or in_channels differ from training, or it was "
            "trained on BGR images (fgs sends RGB)"
        )
        if self.class_order_note:  # the order was just printed: it is the first suspect
            causes = (
                f"the class order: {self.class_order_note}; class_names in the spec must list the classifier's "
                f"outputs in its own output order. Or {causes}"
            )
        return (
            f"{self.summary()}. The feedback would steer towards what it mistakes. Likely causes: {causes}."
            f"{self._tried()} Fix the spec, or pass --force to run anyway."
        )


def _spec_key(spec: ClassifierSpec) -> tuple:
    channels = spec.in_channels
    expand = lambda values: tuple(round(v, 4) for v in (values * channels if len(values) == 1 else values))  # noqa: E731
    return spec.input_size, channels, expand(spec.mean), expand(spec.std)


def _values(values: list[float]) -> str:
    shown = [f"{v:.3f}".rstrip("0").rstrip(".") for v in values]
    return shown[0] if len(set(shown)) == 1 else "[" + ", ".join(shown) + "]"


def _normalisation(spec: ClassifierSpec, mean: list[float], std: list[float], label: str) -> Feeding:
    return Feeding(
        spec.model_copy(update={"mean": mean, "std": std}),
        f"mean {_values(mean)}, std {_values(std)} ({label})",
        "your spec's mean/std look wrong",
    )


def image_statistics(paths: list[Path], channels: int) -> tuple[list[float], list[float]]:
    """Mean and std per channel (pooled into one for a grey classifier, as fgs converts to grey) of the images'
    pixels in [0, 1]: what a team usually normalises with when it trains on its own data."""
    import numpy as np
    from PIL import Image

    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        if channels == 1:
            pixels = pixels.mean(axis=1, keepdims=True).repeat(3, axis=1)
        total += pixels.sum(axis=0)
        squares += (pixels**2).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    if channels == 1:
        return [round(float(mean[0]), 3)], [round(float(std[0]), 3)]
    return [round(float(v), 3) for v in mean], [round(float(v), 3) for v in std]


def _native_size(paths: list[Path]) -> int | None:
    """The side of the sample's most common square size; None when the images are not square."""
    from PIL import Image

    sizes = Counter()
    for path in paths:
        with Image.open(path) as image:
            sizes[image.size] += 1
    (width, height), _count = sizes.most_common(1)[0]
    return width if width == height else None


def alternative_feedings(spec: ClassifierSpec, paths: list[Path]) -> list[Feeding]:
    """The common ways a classifier is fed wrongly, each as the feeding that would fix it: the images' own
    mean/std, 0.5/0.5, none, ImageNet's, the channel order swapped, the other channel count, the images' own size.
    The first in this list wins a tie."""
    mean, std = image_statistics(paths, spec.in_channels)
    feedings = [
        _normalisation(spec, mean, std, "your training images' own statistics"),
        _normalisation(spec, [0.5], [0.5], "0.5/0.5"),
        _normalisation(spec, [0.0], [1.0], "no normalisation"),
    ]
    if spec.in_channels == 3:
        feedings.append(_normalisation(spec, IMAGENET_MEAN, IMAGENET_STD, "ImageNet's"))
        feedings.append(
            Feeding(
                spec,
                "the channels in BGR order",
                "it was trained on BGR images (OpenCV's order) while fgs sends RGB: reverse the channels inside "
                "the exported forward (x.flip(1))",
                swap_channels=True,
            )
        )
    other = 1 if spec.in_channels == 3 else 3
    feedings.append(
        Feeding(
            spec.model_copy(update={"in_channels": other, "mean": spec.mean[:1], "std": spec.std[:1]}),
            f"in_channels {other}",
            f"the spec's in_channels look wrong: it takes {'grey' if other == 1 else 'RGB'} input",
        )
    )
    native = _native_size(paths)
    if native is not None and native != spec.input_size and 8 <= native <= 1024:
        feedings.append(
            Feeding(
                spec.model_copy(update={"input_size": native}),
                f"input_size {native} (your images' size)",
                "the spec's input_size looks wrong",
            )
        )
    given = Feeding(spec, "the spec", "")
    return [f for f in feedings if not f.same_as(given)]


def _clearly_better(accuracy: float, than: float, images: int) -> bool:
    return accuracy - than >= CLEARLY_BETTER_POINTS and round((accuracy - than) * images) >= CLEARLY_BETTER_IMAGES


def _class_order_alternative(
    predicted: list[int], labels: list[int], match: ClassMatch, dataset_classes: list[str]
) -> Alternative | None:
    """When each class's images go mostly to one output, a different one per class, those outputs are the
    classifier's order of the classes: the accuracy under that order, and the class_names it implies."""
    votes: dict[int, Counter] = {}
    for guess, label in zip(predicted, labels, strict=True):
        votes.setdefault(label, Counter())[guess] += 1
    order = {label: counter.most_common(1)[0][0] for label, counter in votes.items()}
    if len(set(order.values())) != len(order) or all(order[c] == match.classifier_index[c] for c in order):
        return None
    correct = sum(votes[label][output] for label, output in order.items())
    moved = [f"{dataset_classes[c]} -> {i}" for c, i in sorted(order.items()) if i != match.classifier_index[c]]
    return Alternative(
        f"your classes read from other outputs ({_some(moved)})",
        "the spec's class_names are not in the classifier's output order",
        correct / len(labels),
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
    workers' own loading and preprocessing (`fgs_classifier.registry`, `LoadedClassifier.preprocess`); below
    WELL_FED_ACCURACY also through each of `alternative_feedings` and the class order its votes imply, keeping
    the best that scores clearly better. None when torch (the train extra) is not installed."""
    try:
        from fgs_client.training import classify_images, load_classifier_archive
    except ImportError:
        return None
    sample = sample_images(dataset, PREFLIGHT_IMAGES_PER_CLASS)
    paths = [path for path, _ in sample]
    labels = [class_index for _, class_index in sample]
    classifier = load_classifier_archive(archive, spec)

    def accuracy_of(predicted: list[int]) -> float:
        return sum(g == match.classifier_index[c] for g, c in zip(predicted, labels, strict=True)) / len(sample)

    predicted = classify_images(classifier, paths)
    accuracy = accuracy_of(predicted)
    hits: dict[int, list[bool]] = {}
    for class_index, guess in zip(labels, predicted, strict=True):
        hits.setdefault(class_index, []).append(guess == match.classifier_index[class_index])
    tried: list[Alternative] = []
    if accuracy < WELL_FED_ACCURACY:
        order = _class_order_alternative(predicted, labels, match, dataset.class_names)
        tried += [order] if order else []
        for feeding in alternative_feedings(spec, paths):
            try:
                guesses = classify_images(
                    replace(classifier, spec=feeding.spec), paths, swap_channels=feeding.swap_channels
                )
            except Exception:  # noqa: BLE001 - an archive that does not take this shape or channel count rules it out
                continue
            tried.append(Alternative(feeding.label, feeding.fix, accuracy_of(guesses)))
    threshold = preflight_threshold(spec.num_classes)
    candidates = [a for a in tried if a.accuracy >= threshold and _clearly_better(a.accuracy, accuracy, len(sample))]
    return PreflightResult(
        accuracy=accuracy,
        images=len(sample),
        threshold=threshold,
        per_class={dataset.class_names[c]: sum(v) / len(v) for c, v in hits.items()},
        better=max(candidates, key=lambda a: a.accuracy) if candidates else None,  # max keeps the first of a tie
        tried=tuple(tried),
        class_order_note=match.note,
    )
