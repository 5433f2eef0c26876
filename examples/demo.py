"""The fgs demo (`./scripts/demo.sh`): balance Digits-LT with entropy feedback and show what it does to the Few classes.

1. Build Digits-LT (long-tailed train split 60 .. 2 images per class, balanced test split) under --work.
2. Train a SmallCNN on the long-tailed train split (Balanced Softmax, seeded) and export it (TorchScript + spec).
3. Start the embedded stack (`fgs up --model fgs-digits`) in the background.
4. `fgs-client balance --dataset digits-lt --criterion entropy --classifier ...`: fill every class up to --target
   with images guided by that classifier; then `fgs-client grid` for contact sheets. Stop the stack.
5. Retrain the same CNN on real + synthetic with fgs's retraining recipe (`fgs_client.training.RETRAIN_RECIPE`,
   chosen on Digits-LT validation) and print Overall / Many / Medium / Few test accuracy before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from fgs_client.digits_lt import build_digits_lt
from fgs_client.training import RETRAIN_RECIPE
from fgs_common.presets import DIGITS_CHOICE
from fgs_lab import digits_classifier as digits
from fgs_lab.embedded_stack import run_client, start_embedded_stack
from fgs_worker.model_loading import EMBEDDED_MODEL, EMBEDDED_MODELS_DIR

console = Console()
EMBEDDED_MODEL_DIR = EMBEDDED_MODELS_DIR / EMBEDDED_MODEL


def default_model() -> str:
    """'fgs-digits' when its weights are in the checkout, else the random-weight 'tiny' model (plumbing only)."""
    return "fgs-digits" if (EMBEDDED_MODEL_DIR / "model_index.json").is_file() else "tiny"


class Stage:
    """Prints a numbered stage header and, at its end, how long it took."""

    def __init__(self, number: int, text: str):
        self.number, self.text = number, text

    def __enter__(self) -> Stage:
        self.start = time.time()
        console.rule(f"[bold]{self.number}. {self.text}")
        return self

    def __exit__(self, kind, *rest) -> None:
        if kind is None:
            console.print(f"[dim]{self.number}. done in {time.time() - self.start:.0f} s[/]")


def accuracy_row(name: str, accuracy) -> list[str]:
    return [name] + [f"{100 * v:.1f}" for v in (accuracy.overall, accuracy.many, accuracy.medium, accuracy.few)]


def main(
    work: Path = typer.Option(Path("demo-out"), help="where the dataset, classifier and balanced set go"),
    model: str = typer.Option(None, help="diffusion model (default: fgs-digits, or tiny when it is missing)"),
    target: str = typer.Option(
        "max", help="images per class after balancing ('max': all up to 60, 415 new images; 15: 53 images)"
    ),
    # Defaults: the `digits` preset, the setting chosen on Digits-LT validation (bench/digits_lt.md); the balance
    # call below passes `--preset digits` too, so the values the demo does not name (γ, feedback input) are its.
    criterion: str = typer.Option(DIGITS_CHOICE["criterion"], help="feedback criterion (the digits preset's)"),
    omega: float = typer.Option(DIGITS_CHOICE["omega"], help="feedback scale ω (the digits preset's)"),
    dropout_p: float = typer.Option(DIGITS_CHOICE["dropout_p"], help="dropout p on the image embedding (the preset's)"),
    steps: int = typer.Option(30, help="DDIM steps per image"),
    seed: int = typer.Option(0),
) -> None:
    started = time.time()
    torch.set_num_threads(1)  # the stack's worker gets the other core
    work = work.resolve()
    root, balanced, classifier_dir = work / "digits-lt", work / "digits-lt-balanced", work / "classifier"
    model = model or default_model()
    if model == "tiny":
        console.print(
            "[yellow]worker/fgs_worker/models/fgs-digits is missing: using the random-weight 'tiny' model "
            "(noise images; plumbing only)[/]"
        )

    with Stage(1, "Digits-LT: long-tailed train split, balanced test split"):
        if not (root / "digits_lt.json").is_file():
            build_digits_lt(root)
        train, test = digits.load_split(root, "train"), digits.load_split(root, "test")
        counts = torch.bincount(train.labels, minlength=10)
        thresholds = digits.shot_thresholds(root)
        console.print(f"{root}: {len(train)} train images per class {counts.tolist()}, {len(test)} test images")

    with Stage(2, "train a SmallCNN on the long-tailed split (Balanced Softmax)"):
        before_model = digits.train_small_cnn(train, seed)
        before = digits.evaluate(before_model, test, counts, thresholds)
        archive, spec = digits.export_digits_classifier(before_model, classifier_dir)
        console.print(f"test accuracy {100 * before.overall:.1f}%, Few {100 * before.few:.1f}%; exported to {archive}")

    with Stage(3, f"start the embedded stack (fgs up --model {model})"):
        stack = start_embedded_stack(work / "stack", model)
    try:
        console.print(f"fgs API on {stack.url} (log: {stack.log_path})")
        with Stage(4, f"fgs-client balance: {criterion} feedback, ω={omega}, dropout p={dropout_p}, {steps} steps"):
            # what a user types: the dataset, where the balanced copy goes, the feedback and the classifier
            dataset = ["--dataset", "digits-lt", "--root", str(root), "--out", str(balanced), "--target", target]
            feedback = ["--criterion", criterion, "--omega", str(omega), "--dropout-p", str(dropout_p)]
            classifier = ["--classifier", str(archive), "--classifier-spec", str(spec)]
            sampling = ["--preset", "digits", "--steps", str(steps), "--seed", str(seed)]
            run_client(stack, "balance", *dataset, *feedback, *classifier, *sampling)
            run_client(stack, "grid", "--out", str(balanced), "--per-class", "10", "--size", "48")
    finally:
        stack.stop()

    with Stage(5, f"retrain on real + synthetic (recipe {RETRAIN_RECIPE.name}: {RETRAIN_RECIPE.description})"):
        synthetic = digits.load_synthetic(balanced)
        after = digits.evaluate(digits.train_small_cnn(train + synthetic, seed), test, counts, thresholds)

    table = Table(
        title=(
            f"Digits-LT test accuracy (%), {len(test)} images; "
            f"Many > {thresholds[0]}, Few < {thresholds[1]} train images"
        )
    )
    for column in ("training set", "Overall", "Many", "Medium", "Few"):
        table.add_column(column, justify="left" if column == "training set" else "right")
    table.add_row(*accuracy_row(f"real only ({len(train)})", before))
    table.add_row(*accuracy_row(f"real + {len(synthetic)} synthetic ({model}, {criterion})", after))
    table.add_row(
        "difference",
        *[
            f"{100 * (a - b):+.1f}"
            for a, b in zip(
                (after.overall, after.many, after.medium, after.few),
                (before.overall, before.many, before.medium, before.few),
                strict=False,
            )
        ],
    )
    console.print(table)
    console.print(
        f"[dim]Retrained with fgs's recipe `{RETRAIN_RECIPE.name}` ({RETRAIN_RECIPE.description}), the one chosen "
        "on Digits-LT validation among fgs_client.training.RETRAIN_RECIPES; what the others measured: "
        "bench/digits_lt.md.[/]"
    )
    console.print(
        f"balanced dataset: {balanced}\nmanifest:         {balanced / 'manifest.csv'}\n"
        f"contact sheets:   {balanced.with_name(balanced.name + '-grid')}\nclassifier:       {archive}"
    )
    console.print(
        f"demo finished in {time.time() - started:.0f} s (one training seed: differences of a few points are noise; "
        "bench/digits_lt.py measures over 10 seeds)"
    )


if __name__ == "__main__":
    typer.run(main)
