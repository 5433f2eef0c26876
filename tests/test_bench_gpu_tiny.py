"""bench/gpu.py --tiny: the GPU benchmark's whole table on the CPU, and fgs unguided equal to diffusers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_prints_the_full_table_on_the_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--tiny",
            "--steps",
            "6",
            "--batches",
            "1",
            "2",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for variant in (
        "diffusers unguided",
        "fgs unguided",
        "fgs entropy unet/full",
        "fgs entropy constant_eps/full",
        "fgs entropy unet/classifier",
        "fgs entropy constant_eps/classifier",
    ):
        for batch in (1, 2):
            assert any(line.startswith(f"| {variant} ") and f"| {batch:>2} |" in line for line in out.splitlines()), (
                variant
            )
    assert "reference loop" in out and "(match)" in out and "TFLOP/s achieved" in out
