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


def test_the_retraining_example_balances_digits_lt_and_prints_accuracy_by_shot(redis_server, tmp_path):
    stack = start_stack(redis_server, EMBEDDED_MODELS_DIR / EMBEDDED_MODEL, tmp_path / "stack", workers=1)
    try:
        env = {**os.environ, "FGS_URL": stack.base_url, "FGS_API_KEY": stack.keys["alpha"], "COLUMNS": "160"}
        small = ["--target", "6", "--gen-steps", "6", "--train-steps", "20", "--work", str(tmp_path / "work")]
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), *small], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        stack.close()
    assert done.returncode == 0, done.stdout + done.stderr
    output = " ".join(done.stdout.split())
    assert "9 synthetic images beside 185 real" in output  # seven, eight, nine (4, 3, 2 images) up to 6
    assert re.search(r"Overall\W+Many\W+Medium\W+Few", output)
    assert "real only (185)" in output and "real + synthetic (194)" in output
