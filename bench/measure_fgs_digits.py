"""Measure the acceptance numbers of the embedded `fgs-digits` model (printed as markdown tables).

    .venv/bin/python bench/measure_fgs_digits.py [--model worker/fgs_worker/models/fgs-digits] [--per-class 20]

1. Text-only samples of every class, classified by a classifier trained on the generator's own (styled) training
   images: share recognised as the prompted class, per class and overall.
2. Text + image samples conditioned on original-style Digits-LT train digits, classified by a classifier trained
   on original-style generator-split digits; also how many text-only vs text + image samples look original-style
   (dark ink on a light background), the stylistic bias image conditioning fixes.
3. Dropout on the image embedding (paper Figure 9): for one conditioning digit per class, the mean pairwise
   distance between samples of different seeds in the first classifier's feature space, for growing p.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer
from diffusers import StableUnCLIPImg2ImgPipeline

from fgs_client.digits_lt import CLASS_NAMES, digits_split, load_digit_arrays, original_style_image
from fgs_lab.digits_model_evaluation import (
    generator_style_classifier,
    mean_pairwise_distance,
    original_style_classifier,
    sample_digits,
)

REPO = Path(__file__).resolve().parents[1]
DROPOUTS = (0.0, 0.2, 0.4, 0.6, 0.8)


def light_background(samples: np.ndarray) -> np.ndarray:
    """Per sample: is the border (the paper) light, i.e. the original style's polarity?"""
    border = np.concatenate([samples[:, :3].reshape(len(samples), -1), samples[:, -3:].reshape(len(samples), -1)], 1)
    return border.mean(1) > 0.5


def main(
    model: Path = typer.Option(REPO / "worker" / "fgs_worker" / "models" / "fgs-digits"),
    per_class: int = typer.Option(20, help="samples per class and mode"),
    seeds_per_image: int = typer.Option(8, help="seeds per conditioning image in the dropout check"),
    dropout_classes: int = typer.Option(10, help="classes (from zero) in the dropout check"),
    styles_per_digit: int = typer.Option(
        4, help="styled copies per generator digit for the generator-style classifier"
    ),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(3.0),
) -> None:
    """Print recognisability per class (text only; text + image) and diversity against dropout p."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(model, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    digits, labels = load_digit_arrays()
    split = digits_split(labels)
    styled_classifier = generator_style_classifier(styles_per_digit)
    original_classifier = original_style_classifier(split.generator)

    rows = []
    diversity = {p: [] for p in DROPOUTS}
    diversity_text = []
    for c, name in enumerate(CLASS_NAMES):
        seeds = list(range(1000 * c, 1000 * c + per_class))
        text_only = sample_digits(pipeline, c, seeds, steps=steps, guidance_scale=guidance_scale)
        train_digits = [i for i in split.train if labels[i] == c]
        conditionings = [original_style_image(digits[train_digits[k % len(train_digits)]]) for k in range(len(seeds))]
        with_image = sample_digits(pipeline, c, seeds, conditionings, steps=steps, guidance_scale=guidance_scale)
        rows.append(
            (
                name,
                float(np.mean(styled_classifier.predict(text_only) == c)),
                float(np.mean(original_classifier.predict(with_image) == c)),
                float(np.mean(light_background(text_only))),
                float(np.mean(light_background(with_image))),
            )
        )
        print(f"{name}: text only {rows[-1][1]:.0%} recognised, text + image {rows[-1][2]:.0%}", flush=True)
        if c >= dropout_classes:
            continue
        conditioning = original_style_image(digits[train_digits[0]])
        dropout_seeds = list(range(50_000 + 100 * c, 50_000 + 100 * c + seeds_per_image))
        for p in DROPOUTS:
            samples = sample_digits(
                pipeline, c, dropout_seeds, conditioning, p, steps=steps, guidance_scale=guidance_scale
            )
            diversity[p].append(mean_pairwise_distance(styled_classifier.features(samples)))
        text_samples = sample_digits(pipeline, c, dropout_seeds, steps=steps, guidance_scale=guidance_scale)
        diversity_text.append(mean_pairwise_distance(styled_classifier.features(text_samples)))
        print(f"{name}: done ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\n{per_class} samples per class and mode, {steps} DDIM steps, guidance scale {guidance_scale}\n")
    print(
        "| class | text only: recognised (generator-style classifier) | text + image: recognised "
        "(original-style classifier) | text only: light paper | text + image: light paper |"
    )
    print("|---|---|---|---|---|")
    for name, text_rate, image_rate, text_light, image_light in rows:
        print(f"| {name} | {text_rate:.0%} | {image_rate:.0%} | {text_light:.0%} | {image_light:.0%} |")
    means = np.mean([row[1:] for row in rows], 0)
    print(f"| **all** | **{means[0]:.1%}** | **{means[1]:.1%}** | {means[2]:.0%} | {means[3]:.0%} |")
    print("\n| image-embedding dropout p | mean pairwise feature distance across seeds (mean over classes) |")
    print("|---|---|")
    for p in DROPOUTS:
        print(f"| {p} | {np.mean(diversity[p]):.2f} |")
    print(f"| text only | {np.mean(diversity_text):.2f} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    typer.run(main)
