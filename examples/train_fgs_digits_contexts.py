"""Train the embedded `fgs-digits-contexts` pipeline and save it (safetensors, diffusers layout).

    .venv/bin/python examples/train_fgs_digits_contexts.py  # -> worker/fgs_worker/models/fgs-digits-contexts (2 cores)
    .venv/bin/python examples/train_fgs_digits_contexts.py --out /tmp/c --scale 0.02  # a short smoke run

Seeded: the same seed, step counts and thread count give the same weights (compare `sha256sum` of two runs'
`unet/diffusion_pytorch_model.safetensors`). The training lives in `fgs_lab.contexts_model_training`; this
script logs progress, writes the model directory, its `model_card.json` and `training.json`, and keeps the
hand-written README.md.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import typer

from fgs_client.digits_contexts import CONTEXTS, PROMPT_TEMPLATE
from fgs_client.digits_lt import CLASS_NAMES
from fgs_lab.contexts_model_training import ContextsPlan, train_fgs_digits_contexts
from fgs_lab.model_directory import save_model_directory, scaled_plan, started

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "worker" / "fgs_worker" / "models" / "fgs-digits-contexts"


def log_progress(stage: str, done: int, total: int, loss: float | None) -> None:
    if done % 100 == 0 or done == total:
        print(f"{time.strftime('%H:%M:%S')} {stage}: {done}/{total} loss {loss:.4f}", flush=True)


def main(
    out: Path = typer.Option(DEFAULT_OUT, help="model directory to (over)write"),
    seed: int = typer.Option(0, help="training seed (the data split has its own, fixed seed)"),
    scale: float = typer.Option(1.0, help="multiply every step count (e.g. 0.02 for a smoke run)"),
    threads: int = typer.Option(2, help="torch CPU threads (results depend on it)"),
) -> None:
    """Train fgs-digits-contexts on the miniature's generator digits drawn in every context, and save it to OUT."""
    torch.set_num_threads(threads)
    plan = ContextsPlan(seed=seed)
    plan = dataclasses.replace(plan, stages=scaled_plan(dataclasses.replace(plan.stages, seed=seed), scale))
    since = started()
    with tempfile.TemporaryDirectory() as workdir:
        result = train_fgs_digits_contexts(Path(workdir), plan, log_progress)
    save_model_directory(result, out, plan, threads, since, bank="context_bank")
    card = {"class_names": list(CLASS_NAMES), "contexts": list(CONTEXTS), "prompt_template": PROMPT_TEMPLATE}
    (out / "model_card.json").write_text(json.dumps({**card, "card": "README.md"}, indent=1))


if __name__ == "__main__":
    typer.run(main)
