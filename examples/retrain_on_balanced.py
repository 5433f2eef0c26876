"""From an ImageFolder training set to a balanced dataset and a retrained classifier, with fgs's training utilities.

    fgs up --model fgs-digits &                    # or any running fgs service (--url, FGS_API_KEY)
    python examples/retrain_on_balanced.py         # builds Digits-LT under --work when --root is not given

1. The training set: `--root` (an ImageFolder, `<root>/<class>/<image>`) and `--test` (the same classes), or
   Digits-LT built under --work (train/ and test/ of `fgs_client.digits_lt`).
2. Balance it with the service: `Client.balance`, the Python form of `fgs-client balance` (same options; with
   `--classifier` and `--classifier-spec` the classifier is checked against your images first, then steers).
3. Train a small CNN twice, on the real images alone and on real + synthetic, with `fgs_client.training`:
   `ManifestDataset` (the rows of manifest.csv), `RealSyntheticBatchSampler` (50/50 real/synthetic batches, paper
   App. J.1), `balanced_softmax_loss` (prior: the real class counts).
4. Print test accuracy by shot (`shot_accuracy`): Many / Medium / Few, with thresholds you pass for your dataset's
   size (Digits-LT's: Many > 20, Few < 6 train images; ImageNet-LT's defaults are 100 and 20).

Needs the train extra (torch). CI runs it on the embedded model with small settings (tests/test_example_retrain.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from fgs_client import Client
from fgs_client.dataset_readers import read_dataset
from fgs_client.digits_lt import FEW_BELOW, MANY_ABOVE, build_digits_lt
from fgs_client.training import ManifestDataset, RealSyntheticBatchSampler, balanced_softmax_loss, shot_accuracy
from fgs_common.settings import get_settings

console = Console()


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """What ManifestDataset's transform receives (a PIL image in RGB) -> [3, size, size] in [0, 1]."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def small_cnn(num_classes: int) -> torch.nn.Module:
    def block(c_in: int, c_out: int) -> torch.nn.Sequential:
        return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))

    return torch.nn.Sequential(
        block(3, 16), block(16, 32), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, num_classes)
    )


def train(data: ManifestDataset, num_classes: int, steps: int, seed: int) -> torch.nn.Module:
    """`steps` minibatches of 32: 50/50 real/synthetic when there are synthetic images, else instance-balanced."""
    torch.manual_seed(seed)
    model = small_cnn(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    prior = data.class_counts(source="real")  # Balanced Softmax's prior: the real counts, with or without synthetic
    if any(data.is_synthetic):
        batches = RealSyntheticBatchSampler(data.labels, data.is_synthetic, 32, real_fraction=0.5, num_batches=steps)
    else:
        generator = torch.Generator().manual_seed(seed)
        batches = [torch.randint(len(data), (32,), generator=generator).tolist() for _ in range(steps)]
    for indices in batches:
        images, labels = zip(*(data[i] for i in indices), strict=True)
        loss = balanced_softmax_loss(model(torch.stack(images)), torch.tensor(labels), prior)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main(
    url: str = typer.Option(os.environ.get("FGS_URL", "http://127.0.0.1:8000"), help="the fgs service"),
    api_key: str = typer.Option(os.environ.get("FGS_API_KEY", ""), help="API key (default: FGS_DEV_API_KEY)"),
    work: Path = typer.Option(Path("retrain-out"), help="where Digits-LT and the balanced set go"),
    root: Path = typer.Option(None, help="your ImageFolder training set (default: Digits-LT built under --work)"),
    test: Path = typer.Option(None, help="your ImageFolder test set, same classes (default: Digits-LT's test)"),
    prompt_template: str = typer.Option("a handwritten digit {class_name}", help="see fgs-client balance"),
    target: str = typer.Option("max", help="images per class after balancing, as `fgs-client balance --target`"),
    gen_steps: int = typer.Option(30, help="DDIM steps per generated image"),
    train_steps: int = typer.Option(300, help="minibatches per training run"),
    many_above: int = typer.Option(MANY_ABOVE, help="Many: classes with more train images than this"),
    few_below: int = typer.Option(FEW_BELOW, help="Few: classes with fewer train images than this"),
    size: int = typer.Option(32, help="image side the CNN trains at"),
    seed: int = typer.Option(0),
) -> None:
    torch.set_num_threads(1)  # leave a core to the service's worker on a small machine
    if root is None:
        digits = work / "digits-lt"
        if not (digits / "digits_lt.json").is_file():
            build_digits_lt(digits)
        root, test = digits / "train", digits / "test"
    out = work / f"{root.name}-balanced"

    console.rule("1-2. balance the training set with the service")
    with Client(url, api_key or get_settings().dev_api_key) as client:
        report = client.balance(
            "imagefolder",
            root,
            out,
            target=target,
            steps=gen_steps,
            prompt_template=prompt_template,
            show_progress=False,
        )
    console.print(f"{report.synthetic_written} synthetic images beside {report.real_images} real in {out}")

    console.rule("3. train on real only, then on real + synthetic")
    transform = lambda image: to_tensor(image, size)  # noqa: E731 - ManifestDataset passes a PIL RGB image
    real = ManifestDataset(out, transform=transform, source="real")
    both = ManifestDataset(out, transform=transform)
    scanned_test = read_dataset("imagefolder", test)
    classes = read_dataset("imagefolder", root).class_names
    if scanned_test.class_names != classes:
        raise typer.BadParameter(f"--test holds classes {scanned_test.class_names}, --root {classes}")
    test_images = torch.stack([to_tensor(Image.open(im.path).convert("RGB"), size) for im in scanned_test.images])
    test_labels = torch.tensor([im.class_index for im in scanned_test.images])

    console.rule("4. test accuracy by shot")
    table = Table(title=f"test accuracy (%), {len(test_labels)} images; Many > {many_above}, Few < {few_below}")
    for column in ("training set", "Overall", "Many", "Medium", "Few"):
        table.add_column(column, justify="left" if column == "training set" else "right")
    counts = real.class_counts(source="real")
    for name, data in ((f"real only ({len(real)})", real), (f"real + synthetic ({len(both)})", both)):
        model = train(data, len(classes), train_steps, seed)
        with torch.no_grad():
            accuracy = shot_accuracy(model(test_images), test_labels, counts, many_above, few_below)
        values = (accuracy.overall, accuracy.many, accuracy.medium, accuracy.few)
        table.add_row(name, *[f"{100 * v:.1f}" for v in values])
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
