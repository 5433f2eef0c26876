"""bench/digits_lt.py --quick end to end: Digits-LT, real CNNs, `fgs up` (tiny model) on a private Redis,
`fgs-client hardness-stats` and `balance` for three variants, retraining, metrics, report and grids."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_digits_lt_quick_writes_report_and_grids(redis_server, tmp_path):
    report, grids = tmp_path / "digits_lt.md", tmp_path / "grids"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "digits_lt.py"), "--quick", "--work", str(tmp_path / "work"), "--report", str(report),
         "--grids", str(grids), "--redis-url", redis_server],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "REDUCED RUN" in text
    # every variant of the quick run got a table row with accuracies, a metrics row and a grid
    for label, name in (("(a) text only", "a_text"), ("(e) (c) + feedback entropy", "e_entropy"), ("(f) (c) + feedback hardness", "f_hardness")):
        rows = [line for line in text.splitlines() if line.startswith(f"| {label}")]
        assert len(rows) == 2, (label, rows)
        # balance target 12: classes five .. nine lack 3, 6, 8, 9, 10 images
        assert f"| {36} |" in rows[0]
        with Image.open(grids / f"{name}.png") as grid:
            assert grid.width >= 8 * 40 and grid.height >= 10 * 80
    accuracy = re.findall(r"\| real only, Balanced Softmax \| 0 \| (\d+\.\d) ±", text)
    assert accuracy and 10.0 < float(accuracy[0]) <= 100.0  # a trained CNN beats chance (10 %) on the test split
    budget_rows = re.findall(r"^\| (\d+)% \| (\d+) \|", text, flags=re.M)
    assert [(int(p), int(n)) for p, n in budget_rows] == [(0, 0), (25, 9), (50, 18), (100, 36)]


def test_synthetic_set_metrics_on_known_distributions():
    import numpy as np
    from fgs_lab.synthetic_set_metrics import density_coverage, frechet_distance

    rng = np.random.default_rng(0)
    real, same = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    shifted = same + np.array([3.0, 0.0, 0.0, 0.0])
    assert frechet_distance(real, same) < 0.05
    assert abs(frechet_distance(real, shifted) - 9.0) < 0.3  # ||mean shift||^2 with equal covariances
    density, coverage = density_coverage(real[:500], same[:500])
    assert 0.8 < density < 1.2 and coverage > 0.9
    collapsed = np.repeat(same[:1], 500, axis=0)  # one image repeated: no diversity
    assert density_coverage(real[:500], collapsed)[1] < 0.05
    assert density_coverage(real[:500], shifted[:500] + 10.0) == (0.0, 0.0)
