"""From an ImageFolder training set to a balanced dataset and a retrained classifier, with fgs's training utilities.

    fgs up --model fgs-digits &                                # or any running fgs service (--url, FGS_API_KEY)
    python examples/retrain_on_balanced.py --preset digits     # builds Digits-LT under --work without --root

The paper's loop (its Fig. 2), in five steps:
1. The training set: `--root` (an ImageFolder, `<root>/<class>/<image>`) and `--test` (the same classes), or
   Digits-LT built under --work (train/ and test/ of `fgs_client.digits_lt`).
2. Train a small CNN on the real images alone (the baseline) and export it as fgs takes a classifier: a
   TorchScript archive and its spec (the README's step 2). It is the feedback classifier unless you pass your own
   (`--classifier`, `--classifier-spec`).
3. Balance the training set with the service: `fgs_client.balance_runner.balance`, the Python form of `fgs-client
   balance` (the same generation flags and `--preset`); the classifier is checked on your images first, then steers
   with the criterion (`--preset digits`: entropy at ω 0.03). `--balanced OUT` skips steps 2 and 3 and retrains on a
   folder `fgs-client balance` already wrote.
4. Retrain the same CNN on real + synthetic with `fgs_client.training`: `ManifestDataset` (the rows of
   manifest.csv) and `RETRAIN_RECIPE`, the retraining recipe every fgs tool uses (chosen on Digits-LT
   validation, bench/digits_lt.md): its `plan` gives the minibatches and the loss's prior, its `loss` the loss.
   The real-only baseline is the same recipe without synthetic images (Balanced Softmax, real counts).
5. Print test accuracy by shot (`shot_accuracy`) of both: Many / Medium / Few, with thresholds you pass for your
   dataset's size (Digits-LT's: Many > 20, Few < 6 train images; ImageNet-LT's defaults are 100 and 20).

Needs the train extra (torch). CI runs it on the embedded model (tests/test_example_retrain.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import typer
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from fgs_client import Client
from fgs_client.balance_runner import balance
from fgs_client.dataset_readers import ScannedDataset, read_dataset
from fgs_client.digits_lt import FEW_BELOW, MANY_ABOVE, METADATA_FILE, build_digits_lt
from fgs_client.generation_options import generation_options
from fgs_client.http_client import FgsClientError
from fgs_client.training import RETRAIN_RECIPE, ManifestDataset, shot_accuracy
from fgs_common.exceptions import UserInputError
from fgs_common.settings import get_settings
from fgs_common.wire import ClassifierSpec, Criterion, GenerationParams

console = Console()


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """What ManifestDataset's transform receives (a PIL image in RGB) -> [3, size, size] in [0, 1]."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def small_cnn(num_classes: int) -> torch.nn.Module:
    def block(c_in: int, c_out: int) -> torch.nn.Sequential:
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        return torch.nn.Sequential(conv, torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(), torch.nn.MaxPool2d(2))

    return torch.nn.Sequential(
        block(3, 32),
        block(32, 64),
        block(64, 64),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, num_classes),
    )


class TrainingImages(Protocol):
    """What `train` takes: ManifestDataset's interface (an (image, class index) per index, labels, flags)."""

    labels: list[int]
    is_synthetic: list[bool]

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class RealImages(torch.utils.data.Dataset):
    """The real training images as the dataset reader found them, in ManifestDataset's form."""

    def __init__(self, dataset: ScannedDataset, size: int):
        self.paths = [image.path for image in dataset.images]
        self.labels = [image.class_index for image in dataset.images]
        self.is_synthetic = [False] * len(self.paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return to_tensor(image.convert("RGB"), self.size), self.labels[index]


def train(data: TrainingImages, num_classes: int, steps: int, seed: int, name: str) -> torch.nn.Module:
    """`steps` minibatches of 32 and the loss of RETRAIN_RECIPE (real only: instance-sampled, Balanced Softmax
    with the real counts)."""
    torch.manual_seed(seed)
    model = small_cnn(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches, prior = RETRAIN_RECIPE.plan(data.labels, data.is_synthetic, 32, steps, seed, num_classes)
    for indices in track(list(batches), description=f"training on {name}", console=console, transient=True):
        images, labels = zip(*(data[i] for i in indices), strict=True)
        loss = RETRAIN_RECIPE.loss(model(torch.stack(images)), torch.tensor(labels), prior)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def export_for_fgs(model: torch.nn.Module, class_names: list[str], size: int, directory: Path) -> tuple[Path, Path]:
    """The classifier as fgs takes it (README step 2): a TorchScript archive and its spec. It was trained on
    `to_tensor`'s [0, 1] pixels, so the spec's normalisation is mean 0, std 1."""
    directory.mkdir(parents=True, exist_ok=True)
    archive, spec = directory / "baseline.pt", directory / "baseline-spec.json"
    torch.jit.save(torch.jit.script(model), str(archive))
    described = ClassifierSpec(
        num_classes=len(class_names), class_names=class_names, input_size=size, mean=[0.0], std=[1.0]
    )
    spec.write_text(described.model_dump_json(indent=2))
    return archive, spec


def class_names_of(data: ManifestDataset) -> list[str]:
    """The class names by index, as manifest.csv records them."""
    names = {row.class_index: row.class_name for row in data.rows}
    return [names[i] for i in range(max(names) + 1)]


@generation_options(typer.BadParameter)
def main(
    generation: GenerationParams,
    url: str = typer.Option(os.environ.get("FGS_URL", "http://127.0.0.1:8000"), help="the fgs service"),
    api_key: str = typer.Option(os.environ.get("FGS_API_KEY", ""), help="API key (default: FGS_DEV_API_KEY)"),
    work: Path = typer.Option(Path("retrain-out"), help="where Digits-LT and the balanced set go"),
    root: Path = typer.Option(None, help="your ImageFolder training set (default: Digits-LT built under --work)"),
    test: Path = typer.Option(None, help="your ImageFolder test set, same classes (needed with --root/--balanced)"),
    balanced: Path = typer.Option(None, help="retrain on this folder `fgs-client balance` wrote; no balancing"),
    prompt_template: str = typer.Option("a handwritten digit {class_name}", help="see fgs-client balance"),
    prompts: Path = typer.Option(None, help="a class -> prompt file, instead of the template (fgs-client balance)"),
    target: str = typer.Option("max", help="images per class after balancing, as `fgs-client balance --target`"),
    classifier: Path = typer.Option(None, help="your classifier, for feedback (see fgs-client balance)"),
    classifier_spec: Path = typer.Option(None, help="its spec JSON (see fgs-client balance)"),
    force: bool = typer.Option(False, help="submit even when the classifier pre-flight refuses"),
    progress: bool = typer.Option(True, help="progress bars"),
    train_steps: int = typer.Option(300, help="minibatches per training run"),
    many_above: int = typer.Option(MANY_ABOVE, help="Many: classes with more train images than this"),
    few_below: int = typer.Option(FEW_BELOW, help="Few: classes with fewer train images than this"),
    size: int = typer.Option(32, help="image side the CNN trains at"),
    seed: int = typer.Option(0),
) -> None:
    torch.set_num_threads(1)  # leave a core to the service's worker on a small machine
    if root is None and balanced is None:
        digits = work / "digits-lt"
        if not (digits / METADATA_FILE).is_file():
            console.print(f"building Digits-LT in {digits}")
            build_digits_lt(digits)
        root, test = digits / "train", digits / "test"
    if test is None:
        raise typer.BadParameter("give --test: an ImageFolder of test images with the same classes")
    transform = lambda image: to_tensor(image, size)  # noqa: E731 - ManifestDataset passes a PIL RGB image
    baseline = None

    if balanced is None:
        console.rule("2. train the baseline on the real images and export it for feedback")
        scanned = read_dataset("imagefolder", root)
        baseline = train(RealImages(scanned, size), len(scanned.class_names), train_steps, seed, "real only")
        if classifier is None and generation.criterion is not Criterion.none:
            classifier, classifier_spec = export_for_fgs(baseline, scanned.class_names, size, work / "classifier")
            console.print(f"feedback classifier: {classifier} with {classifier_spec}")
        out = work / f"{root.name}-balanced"
        console.rule("3. balance the training set with the service")
        try:
            with Client(url, api_key or get_settings().dev_api_key) as client:
                report = balance(
                    client,
                    "imagefolder",
                    root,
                    out,
                    target=target,
                    prompt_template=None if prompts else prompt_template,
                    prompts_file=prompts,
                    classifier=classifier,
                    classifier_spec=classifier_spec,
                    force=force,
                    show_progress=progress,
                    **generation.model_dump(),
                )
        except (FgsClientError, UserInputError) as error:  # what `fgs-client balance` reports too
            console.print(f"[bold red]error:[/] {error}")
            raise typer.Exit(1) from None
        if not report.complete:
            console.print(f"[bold red]error:[/] {len(report.failed_jobs)} jobs failed; rerun to retry them")
            raise typer.Exit(1)
        console.print(f"{report.synthetic_written} synthetic images beside {report.real_images} real in {out}")
    else:
        out = balanced

    console.rule("4. retrain on real + synthetic")
    real = ManifestDataset(out, transform=transform, source="real")
    both = ManifestDataset(out, transform=transform)
    classes = class_names_of(both)
    if baseline is None:
        baseline = train(real, len(classes), train_steps, seed, "real only")
    retrained = train(both, len(classes), train_steps, seed, "real + synthetic")

    console.rule("5. test accuracy by shot")
    scanned_test = read_dataset("imagefolder", test)
    if scanned_test.class_names != classes:
        raise typer.BadParameter(f"--test holds classes {scanned_test.class_names}, the training set {classes}")
    test_images = torch.stack([to_tensor(Image.open(im.path).convert("RGB"), size) for im in scanned_test.images])
    test_labels = torch.tensor([im.class_index for im in scanned_test.images])
    table = Table(title=f"test accuracy (%), {len(test_labels)} images; Many > {many_above}, Few < {few_below}")
    for column in ("training set", "Overall", "Many", "Medium", "Few"):
        table.add_column(column, justify="left" if column == "training set" else "right")
    counts = real.class_counts(source="real")
    for name, model in ((f"real only ({len(real)})", baseline), (f"real + synthetic ({len(both)})", retrained)):
        with torch.no_grad():
            accuracy = shot_accuracy(model(test_images), test_labels, counts, many_above, few_below)
        values = (accuracy.overall, accuracy.many, accuracy.medium, accuracy.few)
        table.add_row(name, *[f"{100 * v:.1f}" for v in values])
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
