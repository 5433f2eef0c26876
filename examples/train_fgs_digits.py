"""Train the embedded `fgs-digits` pipeline and save it (safetensors, diffusers layout).

    .venv/bin/python examples/train_fgs_digits.py  # -> worker/fgs_worker/models/fgs-digits (about 20 min, 2 cores)
    .venv/bin/python examples/train_fgs_digits.py --out /tmp/d --scale 0.1  # a short smoke run

Seeded: the same seed, step counts and thread count give the same weights. The training itself lives in
`fgs_lab.digits_model_training`; this script adds the progress bar and writes the model directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fgs_lab.digits_model_training import TrainingPlan, train_fgs_digits
from fgs_lab.model_directory import save_model_directory, scaled_plan, started

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "worker" / "fgs_worker" / "models" / "fgs-digits"


class RichProgress:
    """One bar per training stage, with the latest loss."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int, loss: float | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(stage, total=total, loss="")
        if done % 10 == 0 or done == total:
            self.bars.update(self.tasks[stage], completed=done, loss=f"loss {loss:.4f}" if loss is not None else "")


def main(
    out: Path = typer.Option(DEFAULT_OUT, help="model directory to (over)write"),
    seed: int = typer.Option(0, help="training seed (the data split has its own, fixed seed)"),
    scale: float = typer.Option(1.0, help="multiply every step count (e.g. 0.1 for a smoke run)"),
    threads: int = typer.Option(2, help="torch CPU threads (results depend on it)"),
) -> None:
    """Train fgs-digits on the generator split of sklearn's digits and save it to OUT."""
    torch.set_num_threads(threads)
    plan = scaled_plan(TrainingPlan(seed=seed), scale)
    since = started()
    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with tempfile.TemporaryDirectory() as workdir, Progress(*columns) as bars:
        result = train_fgs_digits(Path(workdir), plan, RichProgress(bars))
    save_model_directory(result, out, plan, threads, since, bank="style_bank")


if __name__ == "__main__":
    typer.run(main)
