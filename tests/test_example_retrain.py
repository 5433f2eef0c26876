"""examples/retrain_on_balanced.py runs as the README says, on the embedded model, with small settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fgs_worker.model_loading import EMBEDDED_MODEL, EMBEDDED_MODELS_DIR
from support.stack import start_stack

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "retrain_on_balanced.py"
TRAIN = ("--train-steps", "150")


def accuracy_rows(output: str) -> dict[str, list[float]]:
    """The accuracy table's rows: training set -> [Overall, Many, Medium, Few]."""
    rows = re.findall(r"(real only|real \+ synthetic) \(\d+\)\W+([\d.]+)\W+([\d.]+)\W+([\d.]+)\W+([\d.]+)", output)
    return {name: [float(v) for v in values] for name, *values in rows}


def run_example(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=400)


def test_the_retraining_example_trains_exports_balances_with_feedback_and_retrains(redis_server, tmp_path):
    stack = start_stack(redis_server, EMBEDDED_MODELS_DIR / EMBEDDED_MODEL, tmp_path / "stack", workers=1)
    env = {**os.environ, "FGS_URL": stack.base_url, "FGS_API_KEY": stack.keys["alpha"], "COLUMNS": "160"}
    work = tmp_path / "work"
    try:
        # the digits preset's entropy feedback, from the baseline the example trains and exports itself
        # 150 training minibatches, not the example's 300: half the training's CPU; both models still clear the
        # accuracy floor below with room (Overall / Many / Medium: real only 76 / 87 / 91, real + synthetic
        # 86 / 98 / 89; 2026-12-06)
        small = ["--preset", "digits", "--target", "6", "--steps", "6", "--guidance-every", "2", "--no-progress"]
        done = run_example(*small, *TRAIN, "--work", str(work), env=env)
    finally:
        stack.close()
    assert done.returncode == 0, done.stdout + done.stderr
    output = " ".join((done.stdout + done.stderr).split())
    assert f"feedback classifier: {work / 'classifier' / 'baseline.pt'}" in output
    assert re.search(r"pre-flight: the classifier recognises \d+% of 116", output)  # the exported spec fits
    assert "9 synthetic images beside 185 real" in output  # seven, eight, nine (4, 3, 2 images) up to 6
    rows = accuracy_rows(output)
    assert set(rows) == {"real only", "real + synthetic"}, output
    # 400 balanced test images, chance 10 %: both models learned, and balancing does not wipe out the common
    # classes (a double imbalance correction once left Many and Medium at 0 %)
    for name, (overall, many, medium, _) in rows.items():
        assert overall > 60 and many > 60 and medium > 60, (name, rows[name])

    # retrain on the folder it wrote, without the service; --balanced needs --test
    balanced = work / "train-balanced"
    refused = run_example("--balanced", str(balanced), env=env)
    assert refused.returncode == 2 and "give --test" in refused.stdout + refused.stderr
    test = str(work / "digits-lt" / "test")
    again = run_example("--balanced", str(balanced), "--test", test, "--no-progress", *TRAIN, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    # real + synthetic read from manifest.csv both times: the same seeds and data give the same model
    assert accuracy_rows(" ".join(again.stdout.split()))["real + synthetic"] == rows["real + synthetic"]
