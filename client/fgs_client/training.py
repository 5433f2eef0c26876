"""Training on a balanced result (the `train` extra: imports torch; the rest of fgs_client does not).

- `RealSyntheticBatchSampler`: a fixed real/synthetic ratio in every minibatch (paper App. J.1: 50/50), class-balanced;
- `balanced_softmax_loss`: Balanced Softmax (Ren et al. 2020): cross-entropy of logits + log class prior;
- `RetrainRecipe`, `RETRAIN_RECIPE`: THE way every fgs tool retrains on real + synthetic (batches and loss), the
  one chosen on Digits-LT validation among `RETRAIN_RECIPES` (bench/digits_lt.md);
- `shot_accuracy`: Many (>100) / Medium (20..100) / Few (<20) training images per class, as
  classifier-balancing reports;
- `group_accuracy`: per-group, worst-group and mean-group accuracy as SubpopBench reports them;
- `class_embedding_statistics`: the hardness statistics (delegates to fgs_worker's HardnessStats);
- `ManifestDataset`: the images of a `manifest.csv`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fgs_classifier.hardness_stats import HardnessStats
from fgs_classifier.registry import load_classifier
from fgs_client.dataset_writer import MANIFEST_NAME, read_manifest
from fgs_common.exceptions import UserInputError

# ---------------------------------------------------------------- sampling


class RealSyntheticBatchSampler(torch.utils.data.Sampler):
    """Batches of indices with round(batch_size * real_fraction) real and the rest synthetic examples.

    Takes one label and one synthetic flag per example (`ManifestDataset.labels`, `.is_synthetic`); use it as a
    DataLoader's `batch_sampler`. `num_batches` defaults to one pass (len(labels) // batch_size).

    Classes are drawn so that over the whole batch each class is equally likely: a class with only real
    (or only synthetic) examples is drawn more often in its half, and classes with both share what remains.
    When that is impossible (more real-only classes than the real half can carry), each half is class-balanced
    on its own, with a warning. Examples within a class and half are drawn uniformly with replacement.
    """

    def __init__(
        self,
        labels: Sequence[int],
        is_synthetic: Sequence[bool],
        batch_size: int,
        real_fraction: float = 0.5,
        num_batches: int | None = None,
        seed: int = 0,
    ):
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        synthetic_t = torch.as_tensor(list(is_synthetic), dtype=torch.bool)
        if labels_t.shape != synthetic_t.shape:
            raise ValueError("labels and is_synthetic must have the same length")
        if batch_size < 1 or not 0.0 <= real_fraction <= 1.0:
            raise ValueError("batch_size must be >= 1 and real_fraction in [0, 1]")
        self.batch_size = batch_size
        self.num_real = round(batch_size * real_fraction)
        self.num_synthetic = batch_size - self.num_real
        self.num_batches = num_batches if num_batches is not None else max(1, len(labels_t) // batch_size)
        self.seed = seed
        self.epoch = 0
        num_classes = int(labels_t.max()) + 1 if len(labels_t) else 0
        self._real = _ClassIndex(labels_t, ~synthetic_t, num_classes)
        self._synthetic = _ClassIndex(labels_t, synthetic_t, num_classes)
        if self.num_real and not self._real.present.any():
            raise ValueError("real_fraction > 0 but there is no real example")
        if self.num_synthetic and not self._synthetic.present.any():
            raise ValueError("real_fraction < 1 but there is no synthetic example")
        self.real_weights, self.synthetic_weights = self._class_weights(real_fraction)

    def _class_weights(self, r: float) -> tuple[torch.Tensor, torch.Tensor]:
        real, synthetic = self._real.present, self._synthetic.present
        classes = real | synthetic
        n = int(classes.sum())
        real_only, synthetic_only, both = real & ~synthetic, synthetic & ~real, real & synthetic
        w_real = torch.zeros(len(classes), dtype=torch.float64)
        w_synth = torch.zeros(len(classes), dtype=torch.float64)
        # Solve r * p_real(c) + (1 - r) * p_synth(c) = 1 / n for every class c.
        feasible = 0.0 < r < 1.0 and int(real_only.sum()) <= n * r and int(synthetic_only.sum()) <= n * (1 - r)
        if feasible and both.any():
            w_real[real_only] = 1.0 / (n * r)
            w_synth[synthetic_only] = 1.0 / (n * (1 - r))
            w_real[both] = (1.0 - int(real_only.sum()) / (n * r)) / int(both.sum())
            w_synth[both] = (1.0 - int(synthetic_only.sum()) / (n * (1 - r))) / int(both.sum())
        else:
            if 0.0 < r < 1.0 and not torch.equal(real, synthetic):
                warnings.warn(
                    "classes cannot be balanced across the whole batch; each half is class-balanced on its own",
                    stacklevel=2,
                )
            w_real[real] = 1.0
            w_synth[synthetic] = 1.0
        return w_real.clamp_min(0), w_synth.clamp_min(0)

    @property
    def class_frequencies(self) -> torch.Tensor:
        """How often each class appears in these batches on average (sums to 1; uniform when the classes can be
        balanced): the label distribution a model trained on them sees, the prior for `balanced_softmax_loss`."""
        frequencies = torch.zeros_like(self.real_weights)
        for weights, share in ((self.real_weights, self.num_real), (self.synthetic_weights, self.num_synthetic)):
            if share:
                frequencies += share * weights / weights.sum()
        return frequencies / self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for _ in range(self.num_batches):
            picks = []
            if self.num_real:
                picks.append(self._real.draw(self.real_weights, self.num_real, generator))
            if self.num_synthetic:
                picks.append(self._synthetic.draw(self.synthetic_weights, self.num_synthetic, generator))
            yield torch.cat(picks).tolist()


class _ClassIndex:
    """Indices of one source (real or synthetic) grouped by class, for vectorised draws."""

    def __init__(self, labels: torch.Tensor, mask: torch.Tensor, num_classes: int):
        indices = torch.nonzero(mask).flatten()
        order = torch.argsort(labels[indices], stable=True)
        self.sorted_indices = indices[order]
        self.counts = torch.bincount(labels[indices], minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.present = self.counts > 0

    def draw(self, weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        classes = torch.multinomial(weights, n, replacement=True, generator=generator)
        within = (torch.rand(n, generator=generator, dtype=torch.float64) * self.counts[classes]).long()
        return self.sorted_indices[self.offsets[classes] + within]


# ---------------------------------------------------------------- loss


def balanced_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_counts, reduction: str = "mean"
) -> torch.Tensor:
    """Balanced Softmax: cross-entropy of (logits + log prior), prior = class counts / total.

    `class_counts` (counts or frequencies) is the label distribution of the minibatches the model trains on:
    the real class counts for instance-sampled real images, `RealSyntheticBatchSampler.class_frequencies` for
    its batches (uniform: the loss is then plain cross-entropy). The real counts on top of class-balanced
    batches (our former reading of the paper's App. F, J.1; the recipe `real_counts_50`) are a second push towards
    the rare classes paid for in Many (the paper's Fig. 16); with a short training run they can drive Many and
    Medium to 0 %. Which prior the tools use is `RETRAIN_RECIPE`'s.

    A class with no training image would get log 0 = -inf; it is counted as one image (with frequencies: as
    the rarest class present, if that is less) instead, so its logit is pushed down strongly but the loss stays
    finite."""
    counts = torch.as_tensor(class_counts, dtype=logits.dtype, device=logits.device)
    if (counts < 0).any() or not (counts > 0).any():
        raise ValueError("class_counts must be >= 0 with at least one class present")
    counts = torch.where(counts > 0, counts, counts[counts > 0].min().clamp_max(1))
    if counts.shape != logits.shape[-1:]:
        raise ValueError(f"class_counts has {counts.numel()} entries; the logits have {logits.shape[-1]} classes")
    log_prior = torch.log(counts / counts.sum())
    return F.cross_entropy(logits + log_prior, labels, reduction=reduction)


# ---------------------------------------------------------------- the retraining recipe


@dataclass(frozen=True)
class RetrainRecipe:
    """How a classifier is retrained on real + synthetic images: which minibatches it sees and which loss.

    - `synthetic_share`: the share of synthetic images in every minibatch, class-balanced over the whole batch
      (`RealSyntheticBatchSampler`; the paper's App. J.1 uses 0.5); None draws uniformly from the balanced set
      (real and synthetic alike: its natural share, 415 / 600 on Digits-LT).
    - `prior`: Balanced Softmax's prior. "real_counts": the real class counts whatever the batches (our former
      reading of the paper's App. F: it corrects the imbalance a second time on class-balanced batches);
      "batches": the class distribution of the minibatches the model sees (uniform for class-balanced ones, so
      the loss is then plain cross-entropy); "none": plain cross-entropy.

    Without synthetic images every recipe trains the same real-only baseline: instance-sampled batches and
    Balanced Softmax with the real counts (then also the batches' distribution)."""

    name: str
    synthetic_share: float | None
    prior: Literal["real_counts", "batches", "none"]
    description: str

    def plan(
        self,
        labels: Sequence[int],
        is_synthetic: Sequence[bool],
        batch_size: int,
        num_batches: int,
        seed: int,
        num_classes: int | None = None,
    ) -> tuple[Iterator[list[int]], torch.Tensor | None]:
        """(the minibatches of example indices, the prior `loss` takes: counts or frequencies over `num_classes`
        classes (default: the largest label + 1), or None)."""
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        synthetic_t = torch.as_tensor(list(is_synthetic), dtype=torch.bool)
        num_classes = num_classes or int(labels_t.max()) + 1
        real_counts = torch.bincount(labels_t[~synthetic_t], minlength=num_classes)
        if not bool(synthetic_t.any()) or self.synthetic_share is None:
            generator = torch.Generator().manual_seed(seed)
            batches = (
                torch.randint(0, len(labels_t), (batch_size,), generator=generator).tolist() for _ in range(num_batches)
            )
            if not bool(synthetic_t.any()):
                return batches, real_counts
            drawn = torch.bincount(labels_t, minlength=num_classes)  # uniform draws: the set's own distribution
            return batches, {"real_counts": real_counts, "batches": drawn, "none": None}[self.prior]
        sampler = RealSyntheticBatchSampler(
            labels_t.tolist(), synthetic_t.tolist(), batch_size, 1.0 - self.synthetic_share, num_batches, seed
        )
        return iter(sampler), {"real_counts": real_counts, "batches": sampler.class_frequencies, "none": None}[
            self.prior
        ]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """Balanced Softmax with `prior` (from `plan`), plain cross-entropy without one."""
        return F.cross_entropy(logits, labels) if prior is None else balanced_softmax_loss(logits, labels, prior)


# The candidates bench/digits_lt.py compares on Digits-LT validation (issue 21), declared before its run.
RETRAIN_RECIPES = (
    RetrainRecipe(
        "real_counts_50", 0.5, "real_counts", "50 % synthetic, class-balanced; Balanced Softmax, real counts"
    ),
    RetrainRecipe("batches_50", 0.5, "batches", "50 % synthetic, class-balanced; the batches' prior (= cross-entropy)"),
    RetrainRecipe(
        "batches_25", 0.25, "batches", "25 % synthetic, class-balanced; the batches' prior (= cross-entropy)"
    ),
    RetrainRecipe("cross_entropy_set", None, "none", "plain cross-entropy, uniform draws from the balanced set"),
)


def retrain_recipe(name: str) -> RetrainRecipe:
    """The candidate of RETRAIN_RECIPES called `name`."""
    for recipe in RETRAIN_RECIPES:
        if recipe.name == name:
            return recipe
    raise ValueError(f"no retraining recipe {name!r}; known: {', '.join(r.name for r in RETRAIN_RECIPES)}")


# THE recipe of every fgs tool that retrains (the demo, examples/retrain_on_balanced.py, bench/digits_lt.py's
# variants, fgs_lab.digits_classifier): chosen on Digits-LT validation by the rule declared in bench/digits_lt.py
# (RECIPE_RULE), recorded in bench/digits_lt.md. tests/test_retrain_recipe.py fails if a tool trains otherwise.
RETRAIN_RECIPE = retrain_recipe("batches_50")


# ---------------------------------------------------------------- evaluation


def _predictions(predictions) -> np.ndarray:
    array = predictions.detach().cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
    return array.argmax(-1) if array.ndim == 2 else array


def _as_numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


@dataclass(frozen=True)
class ShotAccuracy:
    many: float  # mean per-class accuracy over classes with > many_threshold training images (nan if none)
    medium: float
    few: float  # classes with < few_threshold training images
    overall: float  # accuracy over all test examples
    many_classes: int
    medium_classes: int
    few_classes: int


def shot_accuracy(
    predictions, labels, train_class_counts, many_threshold: int = 100, few_threshold: int = 20
) -> ShotAccuracy:
    """Accuracy by shot, classifier-balancing's convention: the mean of per-class accuracies of the classes in
    each split, classes taken from the test labels; predictions are class ids [N] or logits [N, C].

    `train_class_counts` are the real training images per class (e.g. `ManifestDataset.class_counts("real")`).
    The default thresholds are ImageNet-LT's (Many > 100, Few < 20 of at most 1,280 per class); on a smaller set
    scale them to its largest class, or every class is Few: Digits-LT (largest 60) uses 20 and 6
    (`fgs_client.digits_lt.MANY_ABOVE`, `FEW_BELOW`). A split without classes is nan."""
    predicted, truth = _predictions(predictions), _as_numpy(labels)
    counts = _as_numpy(train_class_counts)
    buckets: dict[str, list[float]] = {"many": [], "medium": [], "few": []}
    for label in np.unique(truth):
        mask = truth == label
        accuracy = float((predicted[mask] == label).mean())
        count = counts[label]
        bucket = "many" if count > many_threshold else "few" if count < few_threshold else "medium"
        buckets[bucket].append(accuracy)
    mean = {k: float(np.mean(v)) if v else math.nan for k, v in buckets.items()}
    return ShotAccuracy(
        many=mean["many"],
        medium=mean["medium"],
        few=mean["few"],
        overall=float((predicted == truth).mean()),
        many_classes=len(buckets["many"]),
        medium_classes=len(buckets["medium"]),
        few_classes=len(buckets["few"]),
    )


@dataclass(frozen=True)
class GroupAccuracy:
    overall: float  # accuracy over all examples
    per_group: dict[int, float]  # accuracy of every group present in the evaluation set
    worst_group: float  # the minimum of per_group (SubpopBench's worst-group accuracy)
    worst_group_id: int
    mean_group: float  # unweighted mean of per_group (SubpopBench's adjusted accuracy)


def subpop_group_ids(labels, attributes, num_attributes: int) -> np.ndarray:
    """SubpopBench's group id: attribute + num_attributes * class (NICO++: a + 6 y)."""
    return _as_numpy(attributes) + num_attributes * _as_numpy(labels)


def group_accuracy(predictions, labels, groups) -> GroupAccuracy:
    """Per-group, worst-group and mean-group accuracy over the groups present in `groups`."""
    correct = _predictions(predictions) == _as_numpy(labels)
    group_ids = _as_numpy(groups)
    per_group = {int(g): float(correct[group_ids == g].mean()) for g in np.unique(group_ids)}
    worst = min(per_group, key=per_group.get)
    return GroupAccuracy(
        overall=float(correct.mean()),
        per_group=per_group,
        worst_group=per_group[worst],
        worst_group_id=worst,
        mean_group=float(np.mean(list(per_group.values()))),
    )


# ---------------------------------------------------------------- embeddings


def class_embedding_statistics(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float | None = None
):
    """Class means, shrinkage covariances, precisions and log-dets for the hardness criterion (HardnessStats)."""
    return HardnessStats.fit(torch.as_tensor(embeddings), torch.as_tensor(labels), num_classes, shrinkage=shrinkage)


def load_classifier_archive(archive: Path, spec):
    """A TorchScript or torch.export archive with its ClassifierSpec, on the CPU (never unpickles)."""
    return load_classifier(Path(archive), spec, None, device="cpu")


def image_tensor(path: Path, size: int | None = None) -> torch.Tensor:
    """An image file as a [3, H, W] float tensor in [0, 1] (resized to size x size when given)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _classifier_outputs(classifier, paths: Sequence[Path], batch_size: int) -> Iterator[tuple]:
    """(logits, embedding or None) per batch of image files, through the classifier's own preprocessing."""
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack(
                [image_tensor(p, classifier.spec.input_size) for p in paths[start : start + batch_size]]
            )
            yield classifier(pixels.to(classifier.device))


def embed_images(
    classifier, paths: Sequence[Path], labels: Sequence[int], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [N, k] of images under a loaded classifier whose forward returns (logits, embedding)."""
    if classifier.spec.output.value != "logits_embedding":
        raise UserInputError("hardness statistics need a classifier whose spec output is 'logits_embedding'")
    chunks = [embedding.float().cpu() for _logits, embedding in _classifier_outputs(classifier, paths, batch_size)]
    if not chunks:
        raise UserInputError("no images to embed")
    return torch.cat(chunks), torch.as_tensor(list(labels), dtype=torch.long)


def classify_images(classifier, paths: Sequence[Path], batch_size: int = 64, swap_channels: bool = False) -> list[int]:
    """The classifier's arg-max class of each image file (what the workers' feedback would take it for): each
    image at its own size in [0, 1] through `LoadedClassifier.preprocess`, the workers' resize, channel match and
    normalisation, then the module. `swap_channels` feeds BGR (the pre-flight's diagnosis of a BGR-trained one)."""
    labels: list[int] = []
    order = [2, 1, 0] if swap_channels else [0, 1, 2]
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            inputs = torch.cat(
                [
                    classifier.preprocess(image_tensor(p)[order].unsqueeze(0).to(classifier.device, classifier.dtype))
                    for p in paths[start : start + batch_size]
                ]
            )
            logits, _embedding = classifier.outputs(inputs)
            labels += [int(label) for label in logits.argmax(1)]
    return labels


# ---------------------------------------------------------------- dataset


class ManifestDataset(torch.utils.data.Dataset):
    """The images listed in `<out>/manifest.csv` (real and synthetic), as (image, class index[, group]).

    `transform` receives each image as a PIL image in RGB (real and synthetic sizes may differ: resize there) and
    returns what the model takes; without one, an image is a [3, H, W] float tensor in [0, 1] at its own size.
    `source` keeps only "real" or "synthetic" rows. `labels` and `is_synthetic` feed RealSyntheticBatchSampler;
    `class_counts("real")` is Balanced Softmax's prior and shot_accuracy's train counts."""

    def __init__(self, out_dir: Path, transform=None, source: str | None = None, return_group: bool = False):
        self.root = Path(out_dir)
        rows = read_manifest(self.root / MANIFEST_NAME)
        if source is not None:
            if source not in ("real", "synthetic"):
                raise ValueError("source must be 'real', 'synthetic' or None")
            rows = [r for r in rows if r.source == source]
        self.rows = rows
        self.transform = transform
        self.return_group = return_group
        self.labels = [r.class_index for r in rows]
        self.is_synthetic = [r.source == "synthetic" for r in rows]
        self.groups = [r.group for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        path = self.root / row.path
        if self.transform is None:
            image = image_tensor(path)
        else:
            with Image.open(path) as opened:
                image = self.transform(opened.convert("RGB"))
        return (image, row.class_index, row.group) if self.return_group else (image, row.class_index)

    def class_counts(self, source: str | None = "real") -> torch.Tensor:
        """Images per class (of one source, or all with None): e.g. the prior of balanced_softmax_loss."""
        labels = [r.class_index for r in self.rows if source is None or r.source == source]
        num_classes = max(self.labels, default=-1) + 1
        return torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes)
