"""What both embedded-model trainers (examples/train_fgs_digits*.py) do around the training: scale the step counts
for a smoke run, and write the model directory with its `training.json` (plan, threads, time, sha256 of every
weight file: a retrain with the same seed, step counts and thread count must give the same hashes)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from fgs_lab.digits_model_training import TrainingPlan, TrainingResult


def scaled_plan(plan: TrainingPlan, scale: float) -> TrainingPlan:
    """Every stage's step count times `scale` (at least 1): 0.02 makes a smoke run of the same code."""
    if scale == 1.0:
        return plan
    return dataclasses.replace(
        plan,
        tower_steps=max(1, int(plan.tower_steps * scale)),
        vae_steps=max(1, int(plan.vae_steps * scale)),
        unet_steps=max(1, int(plan.unet_steps * scale)),
    )


def started() -> tuple[float, float]:
    """Wall and CPU clocks now, for `save_model_directory`'s record of the training's time."""
    return time.perf_counter(), time.process_time()


def save_model_directory(
    result: TrainingResult, out: Path, plan: object, threads: int, since: tuple[float, float], bank: str
) -> dict:
    """Overwrite `out` with the pipeline (safetensors, diffusers layout), keep its hand-written README.md, and
    write `training.json` (`bank`: what the trainer calls its bank, e.g. "style_bank"). Returns the record."""
    wall_s, cpu_s = time.perf_counter() - since[0], time.process_time() - since[1]
    readme = out / "README.md"
    kept_readme = readme.read_text() if readme.exists() else None  # hand-written: the card and measured numbers
    if out.exists():
        shutil.rmtree(out)
    result.pipeline.save_pretrained(out, safe_serialization=True)
    if kept_readme is not None:
        readme.write_text(kept_readme)
    record = {
        "plan": dataclasses.asdict(plan),
        "threads": threads,
        "seconds": {**{k: round(v, 1) for k, v in result.seconds.items()}, "total": round(wall_s, 1)},
        "cpu_seconds": round(cpu_s, 1),
        f"{bank}_images": result.bank_size,
        "generator_digits": result.generator_digits,
        "sha256": {
            str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.rglob("*.safetensors"))
        },
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 1e6:.1f} MB) in {wall_s / 60:.1f} min ({cpu_s / 60:.1f} CPU min): {record['seconds']}")
    return record
