"""Write a PNG grid of `fgs-digits` samples for a person to look at.

    .venv/bin/python bench/digits_samples.py [--model worker/fgs_worker/models/fgs-digits] \
        [--out bench/fgs_digits_samples.png]

Rows are the classes zero .. nine. Columns: the conditioning digit (a Digits-LT train image, original style),
then `--per-column` samples each of text only, text + image (dropout p = 0) and text + image with dropout p on
the image embedding, separated by gaps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer
from diffusers import StableUnCLIPImg2ImgPipeline
from PIL import Image

from fgs_client.digits_lt import CLASS_NAMES, digits_split, load_digit_arrays, original_style_image
from fgs_lab.digits_model_evaluation import sample_digits

REPO = Path(__file__).resolve().parents[1]
CELL = 32
GAP = 8


def main(
    model: Path = typer.Option(REPO / "worker" / "fgs_worker" / "models" / "fgs-digits"),
    out: Path = typer.Option(REPO / "bench" / "fgs_digits_samples.png"),
    per_column: int = typer.Option(4, help="samples per mode"),
    dropout_p: float = typer.Option(0.5),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(3.0),
    scale: int = typer.Option(2, help="pixel magnification of the grid"),
) -> None:
    """Sample every class in three modes and save the grid."""
    torch.set_num_threads(2)
    pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(model, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    digits, labels = load_digit_arrays()
    split = digits_split(labels)
    width = CELL + 3 * (GAP + per_column * CELL)
    grid = Image.new("RGB", (width, len(CLASS_NAMES) * CELL), (128, 128, 128))
    for c in range(len(CLASS_NAMES)):
        conditioning = original_style_image(digits[next(i for i in split.train if labels[i] == c)])
        seeds = list(range(c * 100, c * 100 + per_column))
        blocks = [
            sample_digits(pipeline, c, seeds, steps=steps, guidance_scale=guidance_scale),
            sample_digits(pipeline, c, seeds, conditioning, 0.0, steps=steps, guidance_scale=guidance_scale),
            sample_digits(pipeline, c, seeds, conditioning, dropout_p, steps=steps, guidance_scale=guidance_scale),
        ]
        grid.paste(conditioning, (0, c * CELL))
        x = CELL
        for block in blocks:
            x += GAP
            for sample in block:
                grid.paste(Image.fromarray(np.round(sample * 255).astype(np.uint8)), (x, c * CELL))
                x += CELL
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(out)
    print(
        f"wrote {out}: rows zero..nine; columns: conditioning | text only | text + image | text + image, "
        f"dropout {dropout_p}"
    )


if __name__ == "__main__":
    typer.run(main)
