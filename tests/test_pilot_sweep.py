"""`fgs-client sweep` end to end on fgs-digits (a small sweep), and the suggestion rule on rows made by hand."""

from __future__ import annotations

import io
import json
import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fgs_client.dataset_readers import read_dataset
from fgs_client.pilot_sweep import (
    GRID_LABEL_WIDTH,
    RULE_STATUS,
    ClassSweep,
    SettingRow,
    SweepSetting,
    parse_floats,
    resolve_classes,
    run_sweep,
    setting_rows,
    suggest_setting,
    validated_suggestion,
    write_grid,
)
from fgs_client.preflight import match_classes
from fgs_common.exceptions import UserInputError
from fgs_common.wire import ClassifierSpec, Criterion, GenerationParams, ImageResult, JobState
from support.dataset_trees import write_image


def row(omega: float, share: float, criterion: float, gamma: float = 3.0) -> SettingRow:
    return SettingRow(SweepSetting(omega, gamma), 8, share, criterion, 1.0, 0.5)


def test_rule_picks_the_hardest_setting_that_keeps_the_class():
    rows = [row(0, 0.95, 0.10), row(0.03, 0.90, 0.30), row(0.1, 0.86, 0.60), row(0.3, 0.50, 1.20)]
    pick, reason = suggest_setting(rows)
    assert pick.setting.omega == 0.1  # 0.86 >= 0.95 - 0.10; 0.3 loses the class (0.50)
    assert "ω=0.1" in reason and "0.95" in reason


def test_rule_falls_back_to_no_feedback_when_every_omega_loses_the_class():
    pick, _ = suggest_setting([row(0, 0.9, 0.1), row(0.1, 0.5, 0.9), row(0.3, 0.2, 1.5)])
    assert pick.setting.omega == 0


def test_rule_compares_each_gamma_with_its_own_baseline():
    rows = [
        row(0, 0.95, 0.1, gamma=5),
        row(0.1, 0.90, 0.5, gamma=5),
        row(0, 0.60, 0.3, gamma=1),
        row(0.1, 0.55, 0.8, gamma=1),
    ]
    pick, _ = suggest_setting(rows)
    assert (pick.setting.omega, pick.setting.gamma) == (0.1, 1)  # 0.55 is within 0.10 of γ=1's own 0.60


def test_no_suggestion_without_a_rule_validated_on_digits_lt():
    import fgs_client.pilot_sweep as pilot_sweep

    assert pilot_sweep.VALIDATED_RULE is None  # bench/digits_lt.md records no rule that agreed with validation
    assert validated_suggestion([row(0, 0.95, 0.10), row(0.1, 0.9, 0.6)]) is None


def solid(path, color) -> object:
    Image.new("RGB", (20, 20), color).save(path)
    return path


def test_grid_layouts_place_each_image_by_omega_gamma_and_seed(tmp_path):
    omegas, gammas = (0.0, 0.1), (1.0, 3.0, 5.0)
    settings = [SweepSetting(w, g) for g in gammas for w in omegas]  # the CLI's order: γ outer, ω inner
    colors = {s: (int(200 * s.omega / 0.1) + 20, int(40 * s.gamma), 7) for s in settings}
    images = {
        s: [solid(tmp_path / f"{s.omega}_{s.gamma}_{k}.png", colors[s] if k == 0 else (255, 255, 0)) for k in range(2)]
        for s in settings
    }
    sweep = ClassSweep(3, "three", solid(tmp_path / "real.png", (0, 0, 255)), images, {}, {})
    size, header = 24, 16
    paper = np.asarray(Image.open(write_grid(sweep, settings, tmp_path / "paper.png", size)).convert("RGB"))
    # rows ω (2), columns γ (3) after the real image, 8 px gap: only the first seed is drawn
    assert paper.shape == (header + 2 * size, GRID_LABEL_WIDTH + 4 * size + 8, 3)
    for r, w in enumerate(omegas):
        assert tuple(paper[header + r * size + size // 2, GRID_LABEL_WIDTH + size // 2]) == (0, 0, 255)
        for c, g in enumerate(gammas):
            left = GRID_LABEL_WIDTH + (c + 1) * size + 8
            assert tuple(paper[header + r * size + size // 2, left + size // 2]) == colors[SweepSetting(w, g)]
    seeds = np.asarray(
        Image.open(write_grid(sweep, settings, tmp_path / "seeds.png", size, layout="seeds")).convert("RGB")
    )
    assert seeds.shape == (header + 6 * size, GRID_LABEL_WIDTH + 3 * size + 8, 3)  # a row per setting, 2 seeds
    for r, s in enumerate(settings):
        middle = header + r * size + size // 2
        assert tuple(seeds[middle, GRID_LABEL_WIDTH + size + 8 + size // 2]) == colors[s]
        assert tuple(seeds[middle, GRID_LABEL_WIDTH + 2 * size + 8 + size // 2]) == (255, 255, 0)
    with pytest.raises(ValueError, match="grid layout 'diagonal'"):
        write_grid(sweep, settings, tmp_path / "x.png", size, layout="diagonal")


def test_sweep_options_are_checked_by_name():
    assert parse_floats("0, 0.01,0.3", "omega") == [0.0, 0.01, 0.3]
    with pytest.raises(UserInputError, match="--omega"):
        parse_floats("0,a", "omega")
    assert resolve_classes(
        "nine,7", ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    ) == [9, 7]
    with pytest.raises(UserInputError, match="'ten'"):
        resolve_classes("ten", ["zero", "one"])
    with pytest.raises(UserInputError, match=r"'crane' names several classes \(1, 3\): give the index"):
        resolve_classes("crane", ["kite", "crane", "bee", "crane"])


class RecordingClient:
    """What run_sweep calls on the service, answered at once: every job finishes with one image per seed, each
    predicted as the class_index its request asked for (a classifier that agrees with every image)."""

    def __init__(self):
        self.requests = []

    def upload_image(self, data, filename):
        return SimpleNamespace(image_id="a" * 64)

    def submit_batch(self, requests):
        self.requests += requests
        return SimpleNamespace(job_ids=[str(i) for i in range(len(requests))])

    def wait(self, job_id):
        request = self.requests[int(job_id)]
        results = [
            ImageResult(image_id="b" * 64, seed=seed, criterion_value=0.1, predicted_class=request.class_index)
            for seed in request.seeds()
        ]
        return SimpleNamespace(state=JobState.finished, results=results, error=None)

    def image_bytes(self, image_id):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        return buffer.getvalue()


def test_a_classifier_listing_the_classes_in_another_order_is_swept_with_its_own_indices(tmp_path):
    root = tmp_path / "data"
    for value, name in enumerate(("apple", "banana", "cherry")):
        write_image(root / name / "0.png", value=value)
    scanned = read_dataset("imagefolder", root)
    spec = ClassifierSpec(num_classes=3, class_names=["cherry", "apple", "banana"], input_size=32)
    match = match_classes(spec, scanned.class_names)
    client = RecordingClient()
    settings = [SweepSetting(0.0, 3.0), SweepSetting(0.1, 3.0)]
    base = GenerationParams(criterion=Criterion.entropy, steps=2, guidance_every=1)
    sweeps = run_sweep(
        client,
        scanned,
        [0, 2],  # apple and cherry
        settings,
        base,
        num_seeds=2,
        seed=0,
        classifier_id="c" * 64,
        out=tmp_path / "images",
        classifier_index=match.classifier_index,
    )
    assert [r.class_index for r in client.requests] == [1, 1, 0, 0]  # apple is output 1, cherry output 0
    assert [(s.class_name, s.class_index, s.classifier_class) for s in sweeps] == [("apple", 0, 1), ("cherry", 2, 0)]
    one_real = {0: np.zeros((1, 2)), 2: np.zeros((1, 2))}
    pooled, _per_class = setting_rows(sweeps, settings, one_real, embed=lambda paths: np.zeros((len(paths), 2)))
    assert [r.intended_share for r in pooled] == [1.0, 1.0]  # counted against the classifier's index
    with pytest.raises(UserInputError, match="not the dataset's"):
        match_classes(ClassifierSpec(num_classes=3, class_names=["a", "b", "c"], input_size=32), scanned.class_names)


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """Digits-LT and a briefly trained SmallCNN (returns logits and embedding) exported as the team's classifier."""
    from fgs_client.digits_lt import build_digits_lt
    from fgs_lab.digits_classifier import TrainConfig, export_digits_classifier, load_split, train_small_cnn

    work = tmp_path_factory.mktemp("sweep")
    root = build_digits_lt(work / "digits-lt")
    model = train_small_cnn(load_split(root, "train"), 0, TrainConfig(steps=40))
    archive, spec = export_digits_classifier(model, work / "classifier")
    return root, archive, spec


@pytest.mark.stack  # fgs up and the client CLI
def test_sweep_end_to_end_on_fgs_digits(redis_server, digits_classifier, tmp_path):
    from fgs_lab.embedded_stack import run_client, start_embedded_stack

    root, archive, spec = digits_classifier
    out = tmp_path / "sweep"
    with start_embedded_stack(tmp_path / "stack", "fgs-digits", redis_url=redis_server) as stack:
        output = run_client(
            stack,
            "sweep",
            "--dataset",
            "digits-lt",
            "--root",
            str(root),
            "--classes",
            "seven,nine",
            "--criterion",
            "entropy",
            "--omega",
            "0,0.3",
            "--seeds",
            "3",
            "--steps",
            "6",
            "--guidance-every",
            "2",
            "--classifier",
            str(archive),
            "--classifier-spec",
            str(spec),
            "--out",
            str(out),
            "--size",
            "32",
            capture=True,
        )
        with pytest.raises(subprocess.CalledProcessError) as refused:  # no criterion: nothing to sweep
            run_client(
                stack,
                "sweep",
                "--dataset",
                "digits-lt",
                "--root",
                str(root),
                "--classes",
                "seven",
                "--classifier",
                str(archive),
                "--classifier-spec",
                str(spec),
                "--out",
                str(out),
                capture=True,
            )
    assert refused.value.returncode == 2 and "--criterion" in refused.value.output
    # no rule has agreed with Digits-LT validation: no suggestion, and the reason, on screen and in sweep.md
    assert "suggested:" not in output and "no suggestion: no suggestion rule has been validated" in output
    assert "No suggestion: no suggestion rule has been validated" in (out / "sweep.md").read_text()
    assert "Suggested:" not in (out / "sweep.md").read_text()
    summary = json.loads((out / "sweep.json").read_text())
    assert [(s["omega"], s["images"]) for s in summary["settings"]] == [(0.0, 6), (0.3, 6)]
    for setting in summary["settings"]:
        assert 0.0 <= setting["intended_share"] <= 1.0
        assert 0.0 <= setting["mean_criterion"] <= math.log(10) + 1e-6  # an entropy over 10 classes
        assert 0.0 <= setting["coverage"] <= 1.0  # a share of the real images (NaN: no neighbourhoods)
    assert summary["suggested"] is None and summary["reason"] == RULE_STATUS and summary["grid_layout"] == "paper"
    assert set(summary["per_class"]) == {"seven", "nine"}
    assert "paper layout: the paper's Figures 12-14: rows ω" in " ".join(output.split())
    for name in ("0007_seven", "0009_nine"):
        with Image.open(out / f"grid_{name}.png") as grid:
            # the paper's layout: two rows (ω = 0, 0.3), one column per γ (one here) after the real image
            assert grid.size == (GRID_LABEL_WIDTH + 2 * 32 + 8, 16 + 2 * 32)
            first_seed = sorted((out / "images" / name.split("_")[1]).glob("omega_0.3_gamma_*/seed_*.png"))[0]
            with Image.open(first_seed) as image:
                expected = np.asarray(image.convert("RGB").resize((32, 32)), dtype=float)
            cell = np.asarray(grid.convert("RGB"), dtype=float)[16 + 32 : 16 + 64, GRID_LABEL_WIDTH + 40 :]
            assert np.abs(cell - expected).mean() < 8  # ω = 0.3 is the second row, γ the only column
    assert len(list((out / "images" / "seven").glob("*/seed_*.png"))) == 6
    assert "| ω=0.3 γ=" in (out / "sweep.md").read_text()
