"""The retraining recipes (`fgs_client.training.RETRAIN_RECIPES`) on ONE balanced set: a quick look at a set of
your own; the recipe the tools use is chosen by bench/digits_lt.py over many sets and seeds.

    .venv/bin/python bench/retrain_prior.py --digits demo-out/digits-lt --balanced demo-out/digits-lt-balanced

Reads a Digits-LT root (train/, validation/) and one balanced set written by `fgs-client balance` (the demo's,
for one), retrains the Digits-LT SmallCNN (fgs_lab.digits_classifier) with each candidate recipe for --seeds
training seeds, and prints Overall / Many / Medium / Few on --split (validation unless told) as mean ± standard
error over the seeds. One generated set: the noise of generation is not in the standard error.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fgs_client.training import RETRAIN_RECIPE, RETRAIN_RECIPES
from fgs_lab import digits_classifier as digits


def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=Path, required=True, help="Digits-LT root (train/, validation/, test/)")
    parser.add_argument("--balanced", type=Path, required=True, help="a balanced set of that train split")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    train, held_out = digits.load_split(args.digits, "train"), digits.load_split(args.digits, args.split)
    synthetic = digits.load_synthetic(args.balanced)
    counts = torch.bincount(train.labels, minlength=len(digits.CLASS_NAMES))
    thresholds = digits.shot_thresholds(args.digits)
    runs = {"real only (Balanced Softmax, real counts)": (train, RETRAIN_RECIPE)}
    for recipe in RETRAIN_RECIPES:
        chosen = " (the tools')" if recipe == RETRAIN_RECIPE else ""
        runs[f"real + synthetic, {recipe.name}{chosen}"] = (train + synthetic, recipe)
    print(f"{args.split}: {len(held_out)} images; {len(synthetic)} synthetic; {args.seeds} training seeds; mean ± se")
    print(f"{'training':<50} {'Overall':>12} {'Many':>12} {'Medium':>12} {'Few':>12}")
    for name, (data, recipe) in runs.items():
        models = [digits.train_small_cnn(data, seed, recipe=recipe) for seed in range(args.seeds)]
        scores = [digits.evaluate(model, held_out, counts, thresholds) for model in models]
        cells = [mean_se([getattr(s, part) for s in scores]) for part in ("overall", "many", "medium", "few")]
        print(f"{name:<50} " + " ".join(f"{cell:>12}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
