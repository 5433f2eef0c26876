"""Digits-LT through the real service and client: settings chosen on validation, one comparison read on test.

    .venv/bin/python bench/digits_lt.py            # full protocol (writes bench/digits_lt.md and .json)
    .venv/bin/python bench/digits_lt.py --quick    # CI smoke: tiny model, 2 variants, 2 x 2 seeds, minutes

The protocol, fixed before any number was seen:
1. Digits-LT (fgs_client.digits_lt): long-tailed train split; validation and test, 40 + 40 per class, disjoint.
2. The feedback classifier: the seed-0 real-only Balanced Softmax CNN, exported to the service.
3. Every variant of VALIDATION_VARIANTS balances the train split (`fgs-client balance`, target `max`) once per
   generation seed g (the plan seed: other conditioning picks, other noise, other dropout masks), and a SmallCNN is
   retrained on real + synthetic for every classifier seed s (50/50 class-balanced batches, Balanced Softmax with the
   REAL class counts as its prior, everywhere). Accuracy on VALIDATION only.
4. Selection on validation (highest mean validation Few accuracy, ties by Overall): the best plain variant (no
   feedback) and the best guided one. Written to <work>/selection.json and the report before test is read.
5. Test, once: the pre-declared comparison "best guided - best plain" on Few accuracy, paired by (g, s), and each
   against real only; the budget curve (25/50/100 % of the balancing count) for both.
6. The pilot sweep's suggestion rule (fgs_client.pilot_sweep) on the validation ω family: does its pick agree with
   the ω of the best validation Few accuracy?

Standard errors include the generation noise: the mean over s of each generation seed's accuracy (or paired
difference) is one number per g; the SE is the standard deviation of those G numbers over sqrt(G) (G - 1 degrees
of freedom: with G = 3, two SE is not a 95 % interval; t(0.975, 2) = 4.3).
Results are cached per variant under --work, so a rerun resumes; the report marks what did not run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from fgs_classifier.small_cnn import SmallCNN
from fgs_client.digits_lt import CLASS_NAMES, build_digits_lt, generator_indices, shot_group
from fgs_client.pilot_sweep import SettingRow, SweepSetting, suggest_setting
from fgs_client.set_metrics import density_coverage
from fgs_client.training import load_classifier_archive
from fgs_common.wire import ClassifierSpec
from fgs_lab.digits_classifier import (
    ImageSet,
    TrainConfig,
    evaluate,
    export_digits_classifier,
    load_split,
    load_synthetic,
    shot_thresholds,
    train_small_cnn,
)
from fgs_lab.embedded_stack import run_client, start_embedded_stack
from fgs_lab.synthetic_set_metrics import frechet_distance

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SHOTS = ("overall", "many", "medium", "few")


@dataclass(frozen=True)
class Variant:
    """One way of generating: every generation parameter the bench varies, given explicitly to `fgs-client`."""

    name: str
    label: str
    criterion: str = "none"
    omega: float = 0.0
    gamma: float = 3.0
    dropout_p: float = 0.0
    dropout_scaling: str = "inverted"
    feedback_input: str = "x0"

    @property
    def guided(self) -> bool:
        return self.criterion != "none"

    def args(self) -> tuple[str, ...]:
        return (
            "--criterion",
            self.criterion,
            "--omega",
            str(self.omega),
            "--gamma",
            str(self.gamma),
            "--dropout-p",
            str(self.dropout_p),
            "--dropout-scaling",
            self.dropout_scaling,
            "--feedback-input",
            self.feedback_input,
            "--gradient-path",
            "unet",
            "--feedback-resolution",
            "full",
        )


# The validation sweep (issue 13): plain p in {0, 0.5}; entropy ω in {0.03, 0.1}; γ in {3, 5}; the released feedback
# input; plain zeroing instead of inverted dropout. Few variants, full seeds: the machine is a shared 2-core CPU.
VALIDATION_VARIANTS = (
    Variant("plain_p0", "plain, text + image, p=0, γ=3"),
    Variant("plain_p05", "plain, p=0.5, γ=3", dropout_p=0.5),
    Variant("entropy_w0.03", "entropy ω=0.03, p=0.5, γ=3", "entropy", 0.03, dropout_p=0.5),
    Variant("entropy_w0.1", "entropy ω=0.1, p=0.5, γ=3", "entropy", 0.1, dropout_p=0.5),
    Variant(
        "entropy_w0.03_released",
        "entropy ω=0.03, p=0.5, γ=3, released feedback input",
        "entropy",
        0.03,
        dropout_p=0.5,
        feedback_input="released",
    ),
    Variant("plain_p05_zero", "plain, p=0.5 without 1/(1-p), γ=3", dropout_p=0.5, dropout_scaling="zero"),
    Variant("plain_p05_g5", "plain, p=0.5, γ=5", gamma=5.0, dropout_p=0.5),
    Variant("entropy_w0.03_g5", "entropy ω=0.03, p=0.5, γ=5", "entropy", 0.03, gamma=5.0, dropout_p=0.5),
)
# The ω family the sweep rule is validated on: same p, γ, scaling and feedback input, ω varied.
OMEGA_FAMILY = ("plain_p05", "entropy_w0.03", "entropy_w0.1")
QUICK_VARIANTS = ("plain_p05", "entropy_w0.1")
FULL_SCALE = {
    "model": "fgs-digits",
    "steps": 30,
    "target": "max",
    "generation_seeds": 3,
    "classifier_seeds": 10,
    "train_steps": 200,
}


def mean_se(per_generation: list[list[float]]) -> tuple[float, float]:
    """Mean and SE of values[g][s]: the SE of the G per-generation-seed means (includes the generation noise)."""
    means = np.array([np.mean(row) for row in per_generation if row], dtype=float)
    if len(means) == 0:
        return math.nan, math.nan
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else math.nan
    return float(means.mean()), se


def real_only_se(accuracies: list[dict], shot: str) -> tuple[float, float]:
    """Real only has no generation seed: mean and SE over classifier seeds."""
    return mean_se([[100 * a[shot]] for a in accuracies])


def shot_values(accuracies: list[list[dict]], shot: str, scale: float = 100.0) -> list[list[float]]:
    return [[scale * a[shot] for a in row] for row in accuracies]


def paired(a: list[list[dict]], b: list[list[dict]] | list[dict], shot: str) -> tuple[float, float]:
    """a - b in points, paired by (g, s); b may be real-only (one list over s, the same for every g)."""
    rows = []
    for g, row in enumerate(a):
        other = b[g] if isinstance(b[0], list) else b
        rows.append([100 * (x[shot] - y[shot]) for x, y in zip(row, other, strict=False)])
    return mean_se(rows)


def budget_subset(synthetic: ImageSet, fraction: float) -> ImageSet:
    """The first round(fraction x n_c) synthetic images of every class c (load_synthetic's fixed order)."""
    keep = torch.zeros(len(synthetic), dtype=torch.bool)
    for label in synthetic.labels.unique():
        where = torch.nonzero(synthetic.labels == label).flatten()
        keep[where[: round(fraction * len(where))]] = True
    return synthetic.subset(keep)


def as_dict(accuracy) -> dict[str, float]:
    return {shot: float(getattr(accuracy, shot)) for shot in SHOTS}


class Experiment:
    def __init__(self, work: Path, args: dict):
        self.work, self.args = work, args
        self.generation_seeds, self.classifier_seeds = range(args["generation_seeds"]), range(args["classifier_seeds"])
        self.train_config = TrainConfig(steps=args["train_steps"])
        self.root = work / "digits-lt"
        if not (self.root / "validation").is_dir():
            build_digits_lt(self.root)
        self.train = load_split(self.root, "train")
        self.validation = load_split(self.root, "validation")
        self.counts = torch.bincount(self.train.labels, minlength=len(CLASS_NAMES))
        self.thresholds = shot_thresholds(self.root)
        self.results_dir = work / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.loads: list[float] = []
        self._features = None

    def log(self, text: str) -> None:
        self.loads.append(os.getloadavg()[0])
        print(f"[{time.strftime('%H:%M:%S')}] {text} (load {self.loads[-1]:.1f})", flush=True)

    # -------------------------------------------------------------- caching
    def cached(self, name: str) -> dict | None:
        path = self.results_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def store(self, name: str, result: dict) -> None:
        (self.results_dir / f"{name}.json").write_text(json.dumps(result, indent=1))

    def model_path(self, variant: str, g: int | None, s: int) -> Path:
        return self.work / "models" / variant / (f"g{g}_s{s}.pt" if g is not None else f"s{s}.pt")

    def fit(self, train: ImageSet, seed: int, path: Path | None = None) -> SmallCNN:
        model = train_small_cnn(train, "balanced_softmax", seed, self.train_config)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
        return model

    def load_model(self, path: Path) -> SmallCNN:
        model = SmallCNN(len(CLASS_NAMES), width=self.train_config.width, embedding_dim=2 * self.train_config.width)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()

    def accuracy(self, model: SmallCNN, split: ImageSet) -> dict[str, float]:
        return as_dict(evaluate(model, split, self.counts, self.thresholds))

    # -------------------------------------------------------------- steps
    def real_only(self) -> dict:
        result = self.cached("real_only")
        if result is None:
            self.log(f"real only (Balanced Softmax): {len(self.classifier_seeds)} seeds")
            models = [self.fit(self.train, s, self.model_path("real_only", None, s)) for s in self.classifier_seeds]
            result = {"validation": [self.accuracy(m, self.validation) for m in models]}
            self.store("real_only", result)
        return result

    def set_dir(self, variant: Variant, g: int) -> Path:
        return self.work / "sets" / variant.name / f"g{g}"

    def generate(self, stack, variant: Variant, g: int, classifier: tuple[Path, Path]) -> float:
        """Balance the train split with `variant`, plan seed g; seconds taken (0 when already there)."""
        out = self.set_dir(variant, g)
        if (out / "manifest.csv").is_file():
            return 0.0
        started = time.time()
        extra = ("--classifier", str(classifier[0]), "--classifier-spec", str(classifier[1])) if variant.guided else ()
        if variant.guided and self.args["quick"]:
            # --quick's feedback classifier is trained for a few steps on the tiny model's task: the client's
            # pre-flight (there to catch a spec that does not fit the images) rightly finds it weak
            extra += ("--force",)
        run_client(
            stack,
            "balance",
            "--dataset",
            "digits-lt",
            "--root",
            str(self.root),
            "--out",
            str(out),
            "--target",
            self.args["target"],
            "--seed",
            str(g),
            "--steps",
            str(self.args["steps"]),
            "--guidance-every",
            "5",
            "--images-per-job",
            "16",
            "--no-progress",
            *variant.args(),
            *extra,
            capture=True,
        )
        if g == 0:
            grid = self.args["grids"] / f"{variant.name}.png"
            sheets = self.work / "sheets" / variant.name
            run_client(
                stack,
                "grid",
                "--out",
                str(out),
                "--dest",
                str(sheets),
                "--per-class",
                "8",
                "--size",
                "40",
                capture=True,
            )
            stack_sheets(sheets, grid)
        return time.time() - started

    def features(self):
        if self._features is None:
            from fgs_lab.digits_model_evaluation import original_style_classifier

            model = original_style_classifier(generator_indices(), seed=0)
            self._features = (model, model.features(self.validation.images))
        return self._features

    def few_class_row(self, variant: Variant, sets: list[ImageSet], classifier) -> dict:
        """The pilot sweep's numbers for this variant on the Few classes, pooled over generation seeds."""
        few = [c for c, n in enumerate(self.counts.tolist()) if shot_group(n) == "few"]
        shares, entropies, densities, coverages, images = [], [], [], [], 0
        with torch.no_grad():
            real_logits, real_embedding = classifier(self.train.images)
            for c in few:
                pixels = torch.cat([s.images[s.labels == c] for s in sets])
                logits, embedding = classifier(pixels)
                log_p = torch.log_softmax(logits.float(), -1)
                images += len(pixels)
                shares.append(float((logits.argmax(-1) == c).float().mean()))
                entropies.append(float(-(log_p.exp() * log_p).sum(-1).mean()))
                real = real_embedding[self.train.labels == c].numpy()
                density, coverage = density_coverage(real, embedding.numpy())
                densities.append(density)
                coverages.append(coverage)
        row = SettingRow(
            SweepSetting(variant.omega, variant.gamma),
            images,
            float(np.mean(shares)),
            float(np.mean(entropies)),
            float(np.nanmean(densities)),
            float(np.nanmean(coverages)),
        )
        return row.as_dict()

    def validate(self, variant: Variant, generated: list[Future], classifier) -> dict:
        result = self.cached(variant.name)
        if result is not None:
            return result
        result = {"variant": asdict(variant), "validation": [], "sets": []}
        sets = []
        feature_model, validation_features = self.features()
        for g, future in zip(self.generation_seeds, generated, strict=False):
            seconds = future.result()
            synthetic = load_synthetic(self.set_dir(variant, g))
            sets.append(synthetic)
            features = feature_model.features(synthetic.images)
            density, coverage = density_coverage(validation_features, features)
            result["sets"].append(
                {
                    "generation_seed": g,
                    "images": len(synthetic),
                    "generate_s": seconds,
                    "frechet": frechet_distance(validation_features, features),
                    "density": density,
                    "coverage": coverage,
                }
            )
            self.log(
                f"{variant.name} g{g}: {len(synthetic)} images ({seconds:.0f} s); "
                f"training x{len(self.classifier_seeds)}"
            )
            result["validation"].append(
                [
                    self.accuracy(
                        self.fit(self.train + synthetic, s, self.model_path(variant.name, g, s)), self.validation
                    )
                    for s in self.classifier_seeds
                ]
            )
        result["few_classes"] = self.few_class_row(variant, sets, classifier)
        mean, se = mean_se(shot_values(result["validation"], "few"))
        self.log(f"{variant.name}: validation Few {mean:.1f} ± {se:.1f}")
        self.store(variant.name, result)
        return result

    def test_accuracies(self, name: str, test: ImageSet) -> list[list[dict]] | list[dict]:
        if name == "real_only":
            return [self.accuracy(self.load_model(self.model_path(name, None, s)), test) for s in self.classifier_seeds]
        return [
            [self.accuracy(self.load_model(self.model_path(name, g, s)), test) for s in self.classifier_seeds]
            for g in self.generation_seeds
        ]

    def budget(self, variant: Variant, fraction: float, test: ImageSet) -> dict:
        key = f"budget_{variant.name}_{int(100 * fraction)}"
        result = self.cached(key)
        if result is None:
            self.log(
                f"budget {fraction:.0%} of {variant.name}: training x{len(self.classifier_seeds)} per generation seed"
            )
            result = {"images": [], "test": []}
            for g in self.generation_seeds:
                subset = budget_subset(load_synthetic(self.set_dir(variant, g)), fraction)
                result["images"].append(len(subset))
                result["test"].append(
                    [self.accuracy(self.fit(self.train + subset, s), test) for s in self.classifier_seeds]
                )
            self.store(key, result)
        return result


def stack_sheets(sheets_dir: Path, dest: Path) -> None:
    """One PNG: the per-class contact sheets of `fgs-client grid` stacked top to bottom."""
    sheets = [
        Image.open(p).convert("RGB") for p in sorted(sheets_dir.glob("*.png"), key=lambda p: int(p.name.split("_")[0]))
    ]
    grid = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), (255, 255, 255))
    top = 0
    for sheet in sheets:
        grid.paste(sheet, (0, top))
        top += sheet.height
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest)


def select(variants: list[Variant], results: dict[str, dict]) -> dict:
    """The validation choice: highest mean validation Few accuracy (ties: Overall), plain and guided apart."""

    def key(v: Variant):
        return (
            mean_se(shot_values(results[v.name]["validation"], "few"))[0],
            mean_se(shot_values(results[v.name]["validation"], "overall"))[0],
        )

    plain = [v for v in variants if not v.guided and v.name in results]
    guided = [v for v in variants if v.guided and v.name in results]
    ran = plain + guided
    return {
        "rule": "highest mean validation Few accuracy, ties by Overall; plain and guided chosen apart",
        "best_plain": max(plain, key=key).name if plain else None,
        "best_guided": max(guided, key=key).name if guided else None,
        "best_overall": max(ran, key=key).name if ran else None,  # the `digits` preset (common/fgs_common/presets.py)
        "comparison": "test Few accuracy, best guided - best plain, paired by (generation seed, classifier seed)",
        "chosen_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def fmt(mean_and_se: tuple[float, float], signed: bool = False) -> str:
    mean, se = mean_and_se
    if math.isnan(mean):
        return "—"
    return (f"{mean:+.1f}" if signed else f"{mean:.1f}") + (f" ± {se:.1f}" if not math.isnan(se) else "")


def render(
    args: dict,
    variants: list[Variant],
    results: dict,
    selection: dict | None,
    test: dict,
    rule: dict | None,
    runtime: dict,
) -> str:
    by_name = {v.name: v for v in variants}
    missing = [v.name for v in variants if v.name not in results]
    scaled = [f"{name} {args[name]} (full: {full})" for name, full in FULL_SCALE.items() if args[name] != full]
    left_out = [v.name for v in VALIDATION_VARIANTS if v not in variants]
    lines = [
        "# Digits-LT: settings chosen on validation, one comparison on test",
        "",
        f"Generated by `bench/digits_lt.py{' --quick' if args['quick'] else ''}` on {runtime['finished']}. "
        f"Runtime {runtime['seconds'] / 60:.0f} min on a 2-core CPU shared with other jobs; 1-minute load average "
        f"sampled at each stage: mean {runtime['load_mean']:.1f}, range {runtime['load_min']:.1f} to "
        f"{runtime['load_max']:.1f}.",
    ]
    if args["quick"] or missing or not test or scaled or left_out:
        lines += [
            "",
            "**REDUCED OR PARTIAL RUN.** "
            + ("--quick (tiny model, few seeds). " if args["quick"] else "")
            + (f"Scaled down to fit the machine: {', '.join(scaled)}. " if scaled and not args["quick"] else "")
            + (
                f"Variants of the full sweep left out: {', '.join(left_out)}. "
                if left_out and not args["quick"]
                else ""
            )
            + (f"Validation variants not run: {', '.join(missing)}. " if missing else "")
            + ("Test phase not run. " if not test else ""),
        ]
    lines += [
        "",
        "## Protocol (fixed before the run)",
        f"- Model `{args['model']}`, {args['steps']} DDIM steps, balance target `{args['target']}` per class, "
        "16 images per job; every generation parameter passed explicitly (the defaults do not enter).",
        f"- {args['generation_seeds']} generation seeds per variant (plan seeds 0..{args['generation_seeds'] - 1}: "
        "other "
        f"conditioning picks, noise and dropout masks) × {args['classifier_seeds']} classifier seeds "
        f"(SmallCNN width 16, {args['train_steps']} AdamW steps, batch 32, 50/50 real/synthetic class-balanced "
        "batches).",
        "- Balanced Softmax everywhere with ONE prior: the real train counts (60, 41, 28, 19, 13, 9, 6, 4, 3, 2), "
        "whatever the synthetic budget.",
        "- Splits: validation 40/class and test 40/class, disjoint, seeded (`digits_lt.json`). Every choice below is "
        "made on validation; test is read once, after the selection is written.",
        "- Feedback classifier: the seed-0 real-only Balanced Softmax CNN. Shot groups: Many > 20, Few < 6 train "
        "images.",
        "- ± is the SE over generation seeds of the per-generation-seed mean (over classifier seeds), so it includes "
        f"the generation noise; {args['generation_seeds'] - 1} degrees of freedom.",
        "- Pre-declared test comparison: best guided − best plain (each chosen on validation Few accuracy), Few "
        'accuracy, paired by (generation seed, classifier seed). Feedback "helps" only if the difference exceeds '
        "2 SE.",
        "",
        "## Validation (accuracy %, mean ± SE)",
        "",
        "| variant | Overall | Many | Medium | Few | Δ Few vs real only | Fréchet ↓ | density | coverage "
        "| generation (s per set) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    real = results.get("real_only")
    if real:
        lines.append(
            "| real only (Balanced Softmax) | "
            + " | ".join(fmt(real_only_se(real["validation"], s)) for s in SHOTS)
            + " | — | — | — | — | — |"
        )
    for v in variants:
        r = results.get(v.name)
        if r is None:
            lines.append(f"| {v.label} | not run | | | | | | | | |")
            continue
        sets = r["sets"]
        cells = [fmt(mean_se(shot_values(r["validation"], s))) for s in SHOTS]
        delta = fmt(paired(r["validation"], real["validation"], "few"), signed=True) if real else "—"
        lines.append(
            f"| {v.label} | " + " | ".join(cells) + f" | {delta} | {np.mean([s['frechet'] for s in sets]):.1f} | "
            f"{np.mean([s['density'] for s in sets]):.2f} | {np.mean([s['coverage'] for s in sets]):.2f} | "
            f"{np.mean([s['generate_s'] for s in sets]):.0f} |"
        )
    lines += [
        "",
        "Fréchet distance, density and coverage: each synthetic set against the validation split in a digit "
        "classifier's feature space (trained on generator digits only), averaged over generation seeds.",
    ]
    lines += ["", "## Selection (validation only; written before test was read)", ""]
    if selection:
        lines += [
            f"- Rule: {selection['rule']}.",
            f"- Best plain: **{by_name[selection['best_plain']].label}**."
            if selection["best_plain"]
            else "- Best plain: none ran.",
            f"- Best guided: **{by_name[selection['best_guided']].label}**."
            if selection["best_guided"]
            else "- Best guided: none ran.",
            f"- Best of all (the `digits` preset): **{by_name[selection['best_overall']].label}**."
            if selection.get("best_overall")
            else "- Best of all: none ran.",
            f"- Recorded at {selection['chosen_at']} in `selection.json` (and `bench/digits_lt.json`).",
        ]
    else:
        lines.append("Not made: the validation sweep did not finish.")
    lines += ["", "## Test (read once)", ""]
    if test:
        plain, guided = selection["best_plain"], selection["best_guided"]
        lines += [
            "| comparison (test, paired by g and s) | Δ Few | Δ Overall | Δ Many | Δ Medium |",
            "|---|---:|---:|---:|---:|",
        ]
        if plain and guided:
            lines.append(
                "| **best guided − best plain** (pre-declared) | "
                + " | ".join(
                    fmt(paired(test[guided], test[plain], s), signed=True) for s in ("few", "overall", "many", "medium")
                )
                + " |"
            )
        for name in (guided, plain):
            if name:
                lines.append(
                    f"| {by_name[name].label} − real only | "
                    + " | ".join(
                        fmt(paired(test[name], test["real_only"], s), signed=True)
                        for s in ("few", "overall", "many", "medium")
                    )
                    + " |"
                )
        if plain and guided:
            mean, se = paired(test[guided], test[plain], "few")
            verdict = (
                "feedback beats the best plain variant by more than 2 SE"
                if mean > 2 * se
                else "**feedback does not beat the best plain variant by more than 2 SE**"
            )
            lines += [
                "",
                f"Verdict on the pre-declared comparison: {verdict} (Δ Few {mean:+.1f} points, SE {se:.1f}, "
                f"{args['generation_seeds'] - 1} degrees of freedom).",
            ]
        lines += [
            "",
            "| training set (test accuracy %) | Overall | Many | Medium | Few |",
            "|---|---:|---:|---:|---:|",
            "| real only (Balanced Softmax) | "
            + " | ".join(fmt(real_only_se(test["real_only"], s)) for s in SHOTS)
            + " |",
        ]
        for name in (plain, guided):
            if name:
                lines.append(
                    f"| {by_name[name].label} | "
                    + " | ".join(fmt(mean_se(shot_values(test[name], s))) for s in SHOTS)
                    + " |"
                )
    else:
        lines.append("Not run.")
    lines += [
        "",
        "## Budget curve on test (paper Figure 5 right / Figure 15): Few accuracy % against the synthetic share",
        "",
    ]
    budget = test.get("budget", {}) if test else {}
    if budget:
        lines += [
            "| share of the balancing count | "
            + " | ".join(f"{by_name[n].label}: images | Few | Overall" for n in budget)
            + " |",
            "|---:|" + "---:|---:|---:|" * len(budget),
        ]
        real_cells = fmt(real_only_se(test["real_only"], "few")), fmt(real_only_se(test["real_only"], "overall"))
        lines.append("| 0% | " + " | ".join(f"0 | {real_cells[0]} | {real_cells[1]}" for _ in budget) + " |")
        for fraction in ("25", "50", "100"):
            cells = []
            for curve in budget.values():
                point = curve.get(fraction)
                cells.append(
                    "not run | | "
                    if point is None
                    else f"{np.mean(point['images']):.0f} | {fmt(mean_se(shot_values(point['test'], 'few')))} | "
                    f"{fmt(mean_se(shot_values(point['test'], 'overall')))}"
                )
            lines.append(f"| {fraction}% | " + " | ".join(cells) + " |")
    else:
        lines.append("Not run.")
    lines += ["", "## The pilot sweep's rule against validation (ω family: same p, γ, scaling, feedback input)", ""]
    if rule:
        lines += [
            "| ω | images (Few classes) | intended-class share | mean entropy | density | coverage | validation Few |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rule["rows"]:
            lines.append(
                f"| {row['omega']:g} | {row['images']} | {row['intended_share']:.2f} | {row['mean_criterion']:.3f} | "
                f"{row['density']:.2f} | {row['coverage']:.2f} | {fmt(tuple(row['validation_few']))} |"
            )
        lines += [
            "",
            f"Rule's pick: ω={rule['rule_omega']:g} ({rule['reason']}). Best validation Few: ω={rule['best_omega']:g}. "
            f"**{'Agree' if rule['agree'] else 'Disagree'}**"
            + (
                f"; the validation Few difference between the two is {rule['gap']:+.1f} ± {rule['gap_se']:.1f} points "
                "(paired)."
                if not rule["agree"]
                else "."
            ),
        ]
    else:
        lines.append("Not run (needs the whole ω family on validation).")
    lines += [
        "",
        "Grids (gen seed 0 of each variant; per class real top row, synthetic below): "
        "`bench/digits_lt_grids/<variant>.png`.",
        "What these numbers say: `bench/digits_lt_analysis.md`.",
    ]
    return "\n".join(lines) + "\n"


def rule_agreement(variants: list[Variant], results: dict) -> dict | None:
    family = [v for v in variants if v.name in OMEGA_FAMILY]
    if len(family) < 2 or any(v.name not in results for v in family):
        return None
    rows = [
        SettingRow(
            SweepSetting(r["omega"], r["gamma"]),
            r["images"],
            r["intended_share"],
            r["mean_criterion"],
            r["density"],
            r["coverage"],
        )
        for r in (results[v.name]["few_classes"] for v in family)
    ]
    pick, reason = suggest_setting(rows)
    few = {v.omega: mean_se(shot_values(results[v.name]["validation"], "few")) for v in family}
    best_omega = max(few, key=lambda w: few[w][0])
    by_omega = {v.omega: v for v in family}
    gap, gap_se = paired(
        results[by_omega[pick.setting.omega].name]["validation"],
        results[by_omega[best_omega].name]["validation"],
        "few",
    )
    table = [dict(results[v.name]["few_classes"], validation_few=list(few[v.omega])) for v in family]
    return {
        "rows": table,
        "rule_omega": pick.setting.omega,
        "reason": reason,
        "best_omega": best_omega,
        "agree": pick.setting.omega == best_omega,
        "gap": gap,
        "gap_se": gap_se,
    }


def main(
    quick: bool = typer.Option(False, "--quick", help="CI smoke: tiny model, 2 variants, 2 x 2 seeds, few steps"),
    model: str = typer.Option(None, help="diffusion model (default fgs-digits; --quick: tiny)"),
    generation_seeds: int = typer.Option(3, help="plan seeds per variant"),
    classifier_seeds: int = typer.Option(10, help="classifier training seeds per generation seed"),
    steps: int = typer.Option(30, help="DDIM steps per image"),
    target: str = typer.Option("max", help="balance target per class ('max' = 60)"),
    train_steps: int = typer.Option(200, help="optimizer steps per classifier"),
    variants: str = typer.Option(
        None, help="comma-separated validation variants (default: all of VALIDATION_VARIANTS)"
    ),
    skip_test: bool = typer.Option(False, help="stop after the validation selection"),
    budget: bool = typer.Option(True, "--budget/--no-budget", help="the budget curve on test (the longest step)"),
    work: Path = typer.Option(Path("out/digits-lt-bench"), help="scratch directory (datasets, sets, models, cache)"),
    report: Path = typer.Option(BENCH / "digits_lt.md", help="markdown report to write (and .json beside it)"),
    grids: Path = typer.Option(BENCH / "digits_lt_grids", help="folder for the per-variant PNG grids"),
    redis_url: str = typer.Option(None, help="a Redis for the stack (default: what `fgs up` picks)"),
    workers: int = typer.Option(1, help="workers of the embedded stack"),
    started_at: str = typer.Option(None, help="UTC 'YYYY-mm-dd HH:MM' the run began (a resumed run counts from there)"),
) -> None:
    started = time.time()
    if started_at:
        started = time.mktime(time.strptime(started_at + " UTC", "%Y-%m-%d %H:%M %Z")) - time.timezone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the stack
    torch.set_num_threads(1)  # the stack's worker gets the other core
    if quick:
        model, generation_seeds, classifier_seeds = model or "tiny", min(generation_seeds, 2), min(classifier_seeds, 2)
        steps, target, train_steps = min(steps, 6), "12", min(train_steps, 30)
        variants = variants or ",".join(QUICK_VARIANTS)
    args = dict(
        quick=quick,
        model=model or "fgs-digits",
        generation_seeds=generation_seeds,
        classifier_seeds=classifier_seeds,
        steps=steps,
        target=target,
        train_steps=train_steps,
        grids=grids,
    )
    chosen = [v for v in VALIDATION_VARIANTS if variants is None or v.name in variants.split(",")]
    experiment = Experiment(work.resolve(), args)
    experiment.log(
        f"Digits-LT: {len(experiment.train)} train, {len(experiment.validation)} validation; "
        f"{len(chosen)} variants x {generation_seeds} generation seeds x {classifier_seeds} classifier seeds"
    )
    feedback = export_digits_classifier(
        train_small_cnn(experiment.train, "balanced_softmax", 0, experiment.train_config),
        experiment.work / "classifier",
    )
    feedback_classifier = load_classifier_archive(
        feedback[0], ClassifierSpec.model_validate_json(feedback[1].read_text())
    )
    results: dict[str, dict] = {"real_only": experiment.real_only()}
    stack = None
    if any(experiment.cached(v.name) is None for v in chosen):
        stack = start_embedded_stack(experiment.work / "stack", args["model"], workers=workers, redis_url=redis_url)
    try:
        # Generation runs in a thread (the work happens in the stack's worker process) while this one trains.
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            futures = {
                v.name: [pool.submit(experiment.generate, stack, v, g, feedback) for g in experiment.generation_seeds]
                for v in chosen
                if experiment.cached(v.name) is None
            }
            for v in chosen:
                results[v.name] = experiment.validate(v, futures.get(v.name, []), feedback_classifier)
        finally:
            pool.shutdown(cancel_futures=True)  # on SIGTERM: no further balance runs, only the one under way
    finally:
        if stack is not None:
            stack.stop()
    selection_path = experiment.work / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else select(chosen, results)
    selection_path.write_text(json.dumps(selection, indent=1))
    experiment.log(f"selection written before test is read: {selection}")
    test: dict = {}
    if not skip_test:
        test_split = load_split(experiment.root, "test")
        for name in ("real_only", selection["best_plain"], selection["best_guided"]):
            if name:
                test[name] = experiment.test_accuracies(name, test_split)
        test["budget"] = {}
        for name in (selection["best_plain"], selection["best_guided"]):
            if name:
                variant = next(v for v in chosen if v.name == name)
                curve = {}
                for fraction in (0.25, 0.5):  # with --no-budget, only the points already cached
                    point = (
                        experiment.budget(variant, fraction, test_split)
                        if budget
                        else experiment.cached(f"budget_{name}_{int(100 * fraction)}")
                    )
                    if point is not None:
                        curve[str(int(100 * fraction))] = point
                curve["100"] = {"images": [s["images"] for s in results[name]["sets"]], "test": test[name]}
                test["budget"][name] = curve
    rule = rule_agreement(chosen, results)
    loads = experiment.loads + [os.getloadavg()[0]]
    runtime = dict(
        seconds=time.time() - started,
        finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_mean=float(np.mean(loads)),
        load_min=float(np.min(loads)),
        load_max=float(np.max(loads)),
    )
    text = render(args, chosen, results, selection, test, rule, runtime)
    report.write_text(text)
    summary = {
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "variants": [asdict(v) for v in chosen],
        "selection": selection,
        "best_plain": next((asdict(v) for v in chosen if v.name == selection["best_plain"]), None),
        "best_guided": next((asdict(v) for v in chosen if v.name == selection["best_guided"]), None),
        "best_overall": next((asdict(v) for v in chosen if v.name == selection["best_overall"]), None),
        "validation_few": {v.name: mean_se(shot_values(results[v.name]["validation"], "few")) for v in chosen},
        "rule_agreement": rule,
        "runtime": runtime,
    }
    if test and selection["best_plain"] and selection["best_guided"]:
        summary["test_few_guided_minus_plain"] = paired(
            test[selection["best_guided"]], test[selection["best_plain"]], "few"
        )
    report.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(text)
    experiment.log(f"wrote {report} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    typer.run(main)
