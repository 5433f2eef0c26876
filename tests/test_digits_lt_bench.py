"""bench/digits_lt.py --quick end to end: Digits-LT, real CNNs, `fgs up` (tiny model) on a private Redis,
`fgs-client balance` for two variants x two generation seeds, the retraining recipe chosen on validation, the
variants retrained with it, validation selection, the two test comparisons, the budget curve, the sweep rule's
agreement, report and grids."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.stack  # runs the bench script, which starts fgs up
def test_digits_lt_quick_writes_report_and_grids(redis_server, tmp_path):
    report, grids = tmp_path / "digits_lt.md", tmp_path / "grids"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "digits_lt.py"),
            "--quick",
            "--work",
            str(tmp_path / "work"),
            "--report",
            str(report),
            "--grids",
            str(grids),
            "--redis-url",
            redis_server,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "REDUCED OR PARTIAL RUN" in text
    # every variant of the quick run: a validation row with accuracies (mean ± SE over generation seeds) and a grid
    for label, name in (("plain, p=0.5, γ=3", "plain_p05"), ("entropy ω=0.1, p=0.5, γ=3", "entropy_w0.1")):
        rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        assert rows and " ± " in rows[0], (label, rows)
        with Image.open(grids / f"{name}.png") as grid:
            assert grid.width >= 8 * 40 and grid.height >= 10 * 80
    # the recipe: every candidate measured on validation, one chosen by the declared rule before any variant is judged
    from fgs_client.training import RETRAIN_RECIPES

    recipe = json.loads((tmp_path / "work" / "recipe_selection.json").read_text())
    assert recipe["recipe"] in {r.name for r in RETRAIN_RECIPES} and recipe["rule"].startswith("the highest mean")
    for candidate in RETRAIN_RECIPES:
        assert re.search(rf"^\| `{candidate.name}`( \*\*\(chosen\)\*\*)? \| \d+\.\d ± ", text, flags=re.M), candidate
    log = result.stdout
    assert log.index("recipe chosen on validation") < log.index("plain_p05: validation Few")
    # the selection is written (file and report) before the test split is read
    selection = json.loads((tmp_path / "work" / "selection.json").read_text())
    assert (selection["best_plain"], selection["best_guided"]) == ("plain_p05", "entropy_w0.1")
    assert log.index("selection written before test is read") < log.index("budget 25%")
    assert text.index("## Earlier reads of the test split") < text.index("## Selection") < text.index("## Test")
    assert "+3.8 ± 5.0" in text  # the negative verdict of the first validation-first run is in the history
    # the two pre-declared comparisons: mean ± SE [t-based 95 % interval], df = generation seeds - 1 = 1
    assert "df = 1." in text
    for name in ("(a) chosen synthetic variant − real only", "(b) best guided − best plain"):
        cells = re.findall(
            rf"^\| {re.escape(name)}: [^|]+ \| ([+-]\d+\.\d) ± (\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\] \|",
            text,
            flags=re.M,
        )
        assert cells, (name, text)
        mean, se, low, high = (float(v) for v in cells[0])
        assert low <= mean <= high and abs((high - low) / 2 - 12.71 * se) <= 0.2  # t(0.975, 1) = 12.71
    real = re.findall(r"\| real only \(Balanced Softmax\) \| (\d+\.\d) ± \d+\.\d \|", text)
    assert real and 10.0 < float(real[0]) <= 100.0  # a trained CNN beats chance (10 %) on validation
    # the budget curve for both chosen variants: balance target 12, classes five .. nine lack 3, 6, 8, 9, 10 images
    budget = re.findall(r"^\| (\d+)% \| (\d+) \|.*\| (\d+) \|", text, flags=re.M)
    assert [(int(p), int(a), int(b)) for p, a, b in budget[:4]] == [(0, 0, 0), (25, 9, 9), (50, 18, 18), (100, 36, 36)]
    assert re.search(r"Rule's pick: ω=\S+ .* Best validation Few: ω=\S+\. \*\*(Agree|Disagree)\*\*", text)
    summary = json.loads(report.with_suffix(".json").read_text())
    assert summary["best_overall"]["name"] in ("plain_p05", "entropy_w0.1")
    assert summary["recipe_selection"]["recipe"] == recipe["recipe"] and len(summary["comparisons"]) == 2


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
