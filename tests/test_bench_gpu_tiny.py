"""bench/gpu.py --tiny: the GPU benchmark's whole table on the CPU (a speed switch and the cross-job batching hook
included), and fgs unguided equal to diffusers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack  # runs bench/gpu.py in its own interpreter
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_prints_the_full_table_on_the_cpu():
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
            "--switches",
            "channels-last",
            "--batching",
        ],
        capture_output=True,
        text=True,
        timeout=600,
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
    for variant in ("fgs unguided +channels-last", "fgs entropy unet/full +channels-last"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {variant} "))
        assert row.split("|")[2].strip() == "2" and float(row.split("|")[6]) > 0, row  # batch 2, x diffusers
    assert "reference loop" in out and "(match)" in out and "TFLOP/s achieved" in out
    # the hook: a line saying it is not measured yet, or its rows
    assert any(
        line.startswith(("cross-job batching: not measured", "| cross-job batching")) for line in out.splitlines()
    )
    assert "unfinished" not in out
