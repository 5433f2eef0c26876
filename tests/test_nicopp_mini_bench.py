"""bench/nicopp_mini.py run --quick end to end on the tiny model: the miniature, real-only CNNs, two variants x two
generation seeds planned as `fgs-client balance` plans them, retraining, the validation selection written before
test is read, the one test comparison with its df and interval, and a contact sheet per class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.stack  # the bench runs as a child process
REPO = Path(__file__).resolve().parents[1]


def test_nicopp_mini_quick(tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "nicopp_mini.py"),
            "run",
            "--quick",
            "--model",
            str(tiny_model_dir),
            "--root",
            str(tmp_path / "mini"),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((work / "nicopp_mini.json").read_text())
    selection = json.loads((work / "selection.json").read_text())
    assert selection["best_plain"] == "plain_p05" and selection["best_guided"] == "entropy"
    assert set(record["validation"]) == {"real", "plain_p05", "entropy"}
    assert len(record["validation"]["entropy"]) == 4  # 2 generation seeds x 2 classifier seeds
    # test is read for the three compared rows only, after the selection
    assert set(record["test"]) == {"real", "plain_p05", "entropy"}
    comparison = record["comparison"]
    assert comparison["df"] == 1 and len(comparison["per_generation_seed"]) == 2
    assert comparison["ci95"][0] <= comparison["mean"] <= comparison["ci95"][1]
    for row in record["validation"]["entropy"].values():
        assert 0.0 <= row["worst_group"] <= row["overall"] <= 1.0
    text = (work / "nicopp_mini.md").read_text()
    assert "Pre-declared test comparison" in text and "df 1" in text
    by_count = [line for line in text.splitlines() if line.startswith("| real only | ") and line.count("±") == 5]
    assert len(by_count) == 1 and "groups at 0 % (of 60)" in text  # accuracy by the group's train count
    again = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "nicopp_mini.py"),
            "report",
            str(work / "nicopp_mini.json"),
            "--out",
            str(tmp_path / "again.md"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again.md").read_text() == text  # the tables, rebuilt from the record alone
    sheets = sorted((work / "grids").glob("*.png"))
    assert len(sheets) == 10
    with Image.open(sheets[0]) as sheet:
        assert sheet.width > 8 * 32 and sheet.height >= 6 * 3 * 32  # 6 contexts x (real + 2 variants) rows
