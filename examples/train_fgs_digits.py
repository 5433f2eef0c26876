"""Train the embedded `fgs-digits` pipeline and save it (safetensors, diffusers layout).

    .venv/bin/python examples/train_fgs_digits.py  # -> worker/fgs_worker/models/fgs-digits (about 20 min, 2 cores)
    .venv/bin/python examples/train_fgs_digits.py --out /tmp/d --scale 0.1  # a short smoke run

Seeded: the same seed, step counts and thread count give the same weights. The training itself lives in
`fgs_lab.digits_model_training`; this script adds the progress bar and writes the model directory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fgs_lab.digits_model_training import TrainingPlan, train_fgs_digits

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
    plan = TrainingPlan(seed=seed)
    if scale != 1.0:
        plan = dataclasses.replace(
            plan,
            tower_steps=max(1, int(plan.tower_steps * scale)),
            vae_steps=max(1, int(plan.vae_steps * scale)),
            unet_steps=max(1, int(plan.unet_steps * scale)),
        )
    start = time.perf_counter()
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
    total = time.perf_counter() - start
    readme = out / "README.md"
    kept_readme = readme.read_text() if readme.exists() else None  # hand-written: training notes and measured numbers
    if out.exists():
        shutil.rmtree(out)
    result.pipeline.save_pretrained(out, safe_serialization=True)
    if kept_readme is not None:
        readme.write_text(kept_readme)
    record = {
        "plan": dataclasses.asdict(plan),
        "threads": threads,
        "seconds": {**{k: round(v, 1) for k, v in result.seconds.items()}, "total": round(total, 1)},
        "style_bank_images": result.bank_size,
        "generator_digits": result.generator_digits,
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 1e6:.1f} MB) in {total / 60:.1f} min: {record['seconds']}")


if __name__ == "__main__":
    typer.run(main)
