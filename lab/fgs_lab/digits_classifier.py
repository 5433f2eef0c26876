"""Train and evaluate the Digits-LT SmallCNN (the demo and bench/digits_lt.py share this one loop).

Minibatches and loss come from a `fgs_client.training.RetrainRecipe`: `RETRAIN_RECIPE`, the one every fgs tool
retrains with, unless a bench passes a candidate of `RETRAIN_RECIPES` to compare them (bench/digits_lt.py).
Real-only training is the same under every recipe: instance-sampled minibatches, Balanced Softmax with the real
class counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fgs_classifier.small_cnn import SmallCNN, export_classifier
from fgs_client.digits_lt import CLASS_NAMES, METADATA_FILE
from fgs_client.training import RETRAIN_RECIPE, RetrainRecipe, ShotAccuracy, image_tensor, shot_accuracy
from fgs_common.wire import ClassifierOutput, ClassifierSpec


@dataclass
class ImageSet:
    """Images [N, 3, 32, 32] in [0, 1] with labels [N] and a synthetic flag per image."""

    images: torch.Tensor
    labels: torch.Tensor
    synthetic: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: ImageSet) -> ImageSet:
        return ImageSet(
            torch.cat([self.images, other.images]),
            torch.cat([self.labels, other.labels]),
            torch.cat([self.synthetic, other.synthetic]),
        )

    def subset(self, mask: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[mask], self.labels[mask], self.synthetic[mask])


def load_paths(paths: list[Path], labels: list[int], synthetic: bool) -> ImageSet:
    images = torch.stack([image_tensor(p, 32) for p in paths]) if paths else torch.zeros(0, 3, 32, 32)
    return ImageSet(images, torch.as_tensor(labels, dtype=torch.long), torch.full((len(paths),), synthetic))


def load_split(root: Path, part: str) -> ImageSet:
    """Digits-LT's `train`, `validation` or `test` split, class order of CLASS_NAMES."""
    paths, labels = [], []
    for index, name in enumerate(CLASS_NAMES):
        for path in sorted((Path(root) / part / name).glob("*.png")):
            paths.append(path)
            labels.append(index)
    return load_paths(paths, labels, synthetic=False)


def load_synthetic(balanced_out: Path) -> ImageSet:
    """The synthetic images listed in a balance result's manifest.csv (sorted by path: a fixed order for subsets)."""
    from fgs_client.training import ManifestDataset

    rows = sorted(ManifestDataset(balanced_out, source="synthetic").rows, key=lambda r: r.path)
    return load_paths([Path(balanced_out) / r.path for r in rows], [r.class_index for r in rows], synthetic=True)


def shot_thresholds(root: Path) -> tuple[int, int]:
    """(many_above, few_below) from the dataset's digits_lt.json."""
    thresholds = json.loads((Path(root) / METADATA_FILE).read_text())["shot_thresholds"]
    return int(thresholds["many_above"]), int(thresholds["few_below"])


def _shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels, padding with paper white (the digits' background)."""
    padded = F.pad(images, (max_shift,) * 4, value=1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    size = images.shape[-1]
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())])


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    width: int = 16  # SmallCNN channels: small enough that a run takes seconds on a shared 2-core CPU
    lr: float = 3e-3
    weight_decay: float = 5e-4


def train_small_cnn(
    train: ImageSet, seed: int, config: TrainConfig = TrainConfig(), recipe: RetrainRecipe = RETRAIN_RECIPE
) -> SmallCNN:
    """A SmallCNN trained on `train` (real, or real + synthetic) with `recipe`'s minibatches and loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SmallCNN(len(CLASS_NAMES), width=config.width, embedding_dim=2 * config.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.15
    )
    batches, prior = recipe.plan(train.labels.tolist(), train.synthetic.tolist(), config.batch_size, config.steps, seed)
    model.train()
    for indices in batches:
        images = _shifted(train.images[indices], generator)
        logits, _ = model(images)
        value = recipe.loss(logits, train.labels[indices], prior)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size])[0].argmax(-1) for i in range(0, len(images), batch_size)])


def evaluate(model: SmallCNN, test: ImageSet, train_counts: torch.Tensor, thresholds: tuple[int, int]) -> ShotAccuracy:
    """Overall / Many / Medium / Few accuracy on the balanced test split."""
    many_above, few_below = thresholds
    return shot_accuracy(
        predict(model, test.images), test.labels, train_counts, many_threshold=many_above, few_threshold=few_below
    )


def export_digits_classifier(model: SmallCNN, directory: Path) -> tuple[Path, Path]:
    """TorchScript archive and ClassifierSpec JSON (inputs 32x32 RGB in [0, 1], outputs logits and embedding)."""
    spec = ClassifierSpec(
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        input_size=32,
        mean=[0.0],
        std=[1.0],
        output=ClassifierOutput.logits_embedding,
    )  # the CNN takes pixels in [0, 1] as they are
    return export_classifier(model, directory, spec)
