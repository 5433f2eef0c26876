"""Digits-LT experiment: the paper's Table 2 / Figure 5 / Figure 15 in miniature, through the real service and client.

    .venv/bin/python bench/digits_lt.py            # full: ~10 seeds, every variant (writes bench/digits_lt.md)
    .venv/bin/python bench/digits_lt.py --quick    # CI smoke: tiny model, 3 variants, 2 seeds, minutes

1. Build Digits-LT; train SmallCNNs on the long-tailed real split (ERM and Balanced Softmax) for every seed.
2. Export the seed-0 Balanced Softmax CNN as the feedback classifier; `fgs-client hardness-stats` on the train split.
3. Start the embedded stack (`fgs up`) and balance the train split with every variant (`fgs-client balance`):
   (a) text only, (b) text + image, (c) + dropout, (c') + dropout at a lower γ, (d) + feedback loss,
   (e) + feedback entropy, (f) + feedback hardness; then, for the best criterion, the other gradient path
   (constant_eps) and the other feedback resolution (classifier).
4. Closeness (Fréchet distance, density) and diversity (coverage) of each synthetic set against the real test set,
   in a digit classifier's feature space (fgs_lab/synthetic_set_metrics.py).
5. Retrain on real + synthetic (50/50 batches, Balanced Softmax) for every seed; paired differences against the
   real-only Balanced Softmax CNN of the same seed. Few accuracy against the synthetic budget (25/50/100 %).
6. Write bench/digits_lt.md and a PNG grid per variant (bench/digits_lt_grids/).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from fgs_lab.digits_classifier import (
    ImageSet, TrainConfig, evaluate, export_digits_classifier, load_split, load_synthetic, shot_thresholds, train_small_cnn,
)
from fgs_lab.embedded_stack import run_client, start_embedded_stack
from fgs_lab.synthetic_set_metrics import density_coverage, frechet_distance
from fgs_client.digits_lt import build_digits_lt, generator_indices

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SHOTS = ("overall", "many", "medium", "few")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    args: tuple[str, ...]
    criterion: str = "none"


CRITERION_ROWS = {"loss": "d", "entropy": "e", "hardness": "f"}  # Table 2's row letter of each criterion


def feedback_variant(criterion: str, omega: str, dropout_p: float, gamma: float, name: str | None = None) -> Variant:
    """(c) plus feedback: rows (d)-(f), and the ω sweep's extra rows."""
    letter = CRITERION_ROWS[criterion]
    args = ("--dropout-p", str(dropout_p), "--gamma", str(gamma), "--criterion", criterion, "--omega", omega)
    return Variant(name or f"{letter}_{criterion}_w{omega}", f"({letter}) (c) + feedback {criterion} ω={omega}", args, criterion)


def ablation_variants(dropout_p: float, gamma: float, low_gamma: float, omegas: dict[str, float]) -> list[Variant]:
    """Table 2's rows (a)-(f) and the diversity control (c) at a lower γ."""
    return [
        Variant("a_text", "(a) text only", ("--text-only", "--gamma", str(gamma))),
        Variant("b_text_image", "(b) text + image", ("--gamma", str(gamma))),
        Variant("c_dropout", f"(c) text + image + dropout p={dropout_p}", ("--dropout-p", str(dropout_p), "--gamma", str(gamma))),
        Variant("c_low_gamma", f"(c') as (c), γ={low_gamma}", ("--dropout-p", str(dropout_p), "--gamma", str(low_gamma))),
        *[feedback_variant(c, str(omegas[c]), dropout_p, gamma, name=f"{letter}_{c}") for c, letter in CRITERION_ROWS.items()],
    ]


def omega_variants(sweep: str, dropout_p: float, gamma: float) -> list[Variant]:
    """Extra feedback strengths, e.g. "entropy:0.03,entropy:0.3" (the prototype's working range is 0.03 to 0.3)."""
    return [feedback_variant(*item.split(":"), dropout_p, gamma) for item in filter(None, sweep.split(","))]


def path_variants(best: Variant) -> list[Variant]:
    """The best criterion with the other gradient path and the other feedback resolution."""
    return [
        Variant(best.name + "_constant_eps", f"{best.label}, gradient path constant_eps", best.args + ("--gradient-path", "constant_eps"), best.criterion),
        Variant(best.name + "_classifier_res", f"{best.label}, feedback at classifier resolution", best.args + ("--feedback-resolution", "classifier"), best.criterion),
    ]


@dataclass
class Result:
    variant: Variant | None
    label: str
    accuracies: list[dict[str, float]] = field(default_factory=list)  # one per seed
    synthetic: int = 0
    fid: float = math.nan
    density: float = math.nan
    coverage: float = math.nan
    generate_s: float = 0.0

    def mean(self, shot: str) -> float:
        return float(np.mean([a[shot] for a in self.accuracies]))


def as_dict(accuracy) -> dict[str, float]:
    return {shot: getattr(accuracy, shot) for shot in SHOTS}


def mean_se(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return float(array.mean()), se


def budget_subset(synthetic: ImageSet, fraction: float) -> ImageSet:
    """The first round(fraction x n_c) synthetic images of every class c (load_synthetic's fixed order)."""
    keep = torch.zeros(len(synthetic), dtype=torch.bool)
    for label in synthetic.labels.unique():
        where = torch.nonzero(synthetic.labels == label).flatten()
        keep[where[: round(fraction * len(where))]] = True
    return synthetic.subset(keep)


def variant_grid(balanced: Path, dest: Path, stack, work: Path) -> None:
    """One PNG per variant: the per-class contact sheets of `fgs-client grid`, stacked top to bottom."""
    sheets_dir = work / "sheets" / dest.stem
    run_client(stack, "grid", "--out", str(balanced), "--dest", str(sheets_dir), "--per-class", "8", "--size", "40", capture=True)
    sheets = [Image.open(p).convert("RGB") for p in sorted(sheets_dir.glob("*.png"), key=lambda p: int(p.name.split("_")[0]))]
    grid = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), (255, 255, 255))
    top = 0
    for sheet in sheets:
        grid.paste(sheet, (0, top))
        top += sheet.height
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest)


class Experiment:
    def __init__(self, work: Path, seeds: int, train: TrainConfig, generation: tuple[str, ...], target: str, grids_dir: Path):
        self.work, self.seeds, self.train_config, self.generation, self.target, self.grids_dir = work, seeds, train, generation, target, grids_dir
        self.root = work / "digits-lt"
        if not (self.root / "digits_lt.json").is_file():
            build_digits_lt(self.root)
        self.train, self.test = load_split(self.root, "train"), load_split(self.root, "test")
        self.counts = torch.bincount(self.train.labels, minlength=10)
        self.thresholds = shot_thresholds(self.root)
        self.features = None

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def fit(self, train: ImageSet, loss: str) -> list[dict[str, float]]:
        return [as_dict(evaluate(train_small_cnn(train, loss, seed, self.train_config), self.test, self.counts, self.thresholds)) for seed in range(self.seeds)]

    def feature_space(self):
        if self.features is None:
            from fgs_lab.digits_model_evaluation import original_style_classifier

            self.features = original_style_classifier(generator_indices(), seed=0)
            self.test_features = self.features.features(self.test.images)
        return self.features

    def generate(self, stack, variant: Variant, classifier: tuple[Path, Path], hardness: Path) -> Result:
        out = self.work / "sets" / variant.name
        started = time.time()
        extra = ("--classifier", str(classifier[0]), "--classifier-spec", str(classifier[1])) if variant.criterion != "none" else ()
        if variant.criterion == "hardness":
            extra += ("--hardness-stats", str(hardness))
        self.log(f"balancing with {variant.label}")
        run_client(stack, "balance", "--dataset", "digits-lt", "--root", str(self.root), "--out", str(out), "--target", self.target,
                   *self.generation, *variant.args, *extra)
        result = Result(variant, variant.label, generate_s=time.time() - started)
        variant_grid(out, self.grids_dir / f"{variant.name}.png", stack, self.work)
        synthetic = load_synthetic(out)
        result.synthetic = len(synthetic)
        features = self.feature_space().features(synthetic.images)
        result.fid = frechet_distance(self.test_features, features)
        result.density, result.coverage = density_coverage(self.test_features, features)
        self.log(f"{variant.name}: {len(synthetic)} images in {result.generate_s:.0f} s; retraining x{self.seeds}")
        result.accuracies = self.fit(self.train + synthetic, "balanced_softmax")
        self.log(f"{variant.name}: overall {result.mean('overall'):.3f} few {result.mean('few'):.3f}")
        return result


def paired(a: Result, b: Result, shot: str) -> tuple[float, float]:
    """Mean and SE over seeds of a - b (percentage points), paired by classifier seed."""
    return mean_se([100 * (x[shot] - y[shot]) for x, y in zip(a.accuracies, b.accuracies)])


def target_checks(results: list[Result], bs: Result) -> list[str]:
    """The issue's targets, each a paired difference on Few accuracy that must exceed two standard errors."""
    plain = [r for r in results if r.variant.criterion == "none"]
    guided = [r for r in results if r.variant.criterion != "none"]
    lines = ["## Targets (paired over seeds; met when the difference is above two standard errors)", "",
             "| comparison | Δ Few (pp) | SE | met |", "|---|---:|---:|---|"]

    def check(label: str, a: Result, b: Result) -> None:
        mean, se = paired(a, b, "few")
        lines.append(f"| {label} | {mean:+.1f} | {se:.1f} | {'yes' if mean > 2 * se else 'no'} |")

    if plain and guided:
        best_plain = max(plain, key=lambda r: (r.mean("few"), r.mean("overall")))
        best_guided = max(guided, key=lambda r: (r.mean("few"), r.mean("overall")))
        check(f"best feedback {best_guided.label} − best plain {best_plain.label}", best_guided, best_plain)
        for other in plain:
            if other is not best_plain:
                check(f"best feedback − {other.label}", best_guided, other)
        check(f"best plain {best_plain.label} − real only (Balanced Softmax)", best_plain, bs)
    by_name = {r.variant.name: r for r in results}
    if "a_text" in by_name and "b_text_image" in by_name:
        a, b = by_name["a_text"], by_name["b_text_image"]
        lines += ["", f"Closeness to the real test set: text + image Fréchet distance {b.fid:.1f} vs text only {a.fid:.1f} "
                      f"({'closer' if b.fid < a.fid else 'NOT closer'}); density {b.density:.3f} vs {a.density:.3f}."]
    return lines


def render(results: list[Result], erm: Result, bs: Result, budget: list[tuple[float, int, Result]], best: Variant, header: list[str]) -> str:
    lines = header + ["", "## Accuracy (%) on the balanced test split, mean ± SE over seeds", "",
                      "| training set | synthetic | Overall | Many | Medium | Few | Δ Overall vs BS (paired) | Δ Few vs BS (paired) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(result: Result) -> str:
        cells = []
        for shot in SHOTS:
            mean, se = mean_se([100 * a[shot] for a in result.accuracies])
            cells.append(f"{mean:.1f} ± {se:.1f}")
        deltas = []
        for shot in ("overall", "few"):
            mean, se = mean_se([100 * (a[shot] - b[shot]) for a, b in zip(result.accuracies, bs.accuracies)])
            deltas.append("—" if result is bs else f"{mean:+.1f} ± {se:.1f}")
        return f"| {result.label} | {result.synthetic} | " + " | ".join(cells + deltas) + " |"

    lines += [row(erm), row(bs)] + [row(r) for r in results]
    lines += ["", *target_checks(results, bs)]
    lines += ["", "## Synthetic sets against the real test split (digit-classifier feature space; paper Table 2's columns)", "",
              "| variant | images | Fréchet distance ↓ | density ↑ | coverage ↑ | generation (s) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.label} | {r.synthetic} | {r.fid:.2f} | {r.density:.3f} | {r.coverage:.3f} | {r.generate_s:.0f} |" for r in results]
    lines += ["", f"## Accuracy (%) against the synthetic budget: {best.label} (paper Figure 5 right / Figure 15)", "",
              "| share of the balancing count | synthetic images | Few | Medium | Many | Overall |", "|---:|---:|---:|---:|---:|---:|"]
    for fraction, count, result in [(0.0, 0, bs)] + budget:
        cells = [f"{mean_se([100 * a[s] for a in result.accuracies])[0]:.1f} ± {mean_se([100 * a[s] for a in result.accuracies])[1]:.1f}" for s in ("few", "medium", "many", "overall")]
        lines.append(f"| {100 * fraction:.0f}% | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(
    quick: bool = typer.Option(False, "--quick", help="CI smoke: tiny model, 3 variants, 2 seeds, few steps"),
    model: str = typer.Option(None, help="diffusion model (default fgs-digits; --quick: tiny)"),
    seeds: int = typer.Option(10, help="classifier training seeds per configuration"),
    steps: int = typer.Option(30, help="DDIM steps per image"),
    target: str = typer.Option("max", help="balance target per class ('max' = 60)"),
    train_steps: int = typer.Option(200, help="optimizer steps per classifier"),
    dropout_p: float = typer.Option(0.5),
    gamma: float = typer.Option(3.0),
    low_gamma: float = typer.Option(1.5),
    omega_entropy: float = typer.Option(0.1),
    omega_loss: float = typer.Option(0.05),
    omega_hardness: float = typer.Option(0.1),
    omega_sweep: str = typer.Option("entropy:0.03,entropy:0.3", help="extra criterion:ω variants (comma-separated)"),
    only: str = typer.Option(None, help="comma-separated variant names to run (a reduced run; the report says so)"),
    work: Path = typer.Option(Path("out/digits-lt-bench"), help="scratch directory (datasets, synthetic sets, stack)"),
    report: Path = typer.Option(BENCH / "digits_lt.md", help="markdown report to write"),
    grids: Path = typer.Option(BENCH / "digits_lt_grids", help="folder for the per-variant PNG grids"),
    redis_url: str = typer.Option(None, help="a Redis for the stack (default: what `fgs up` picks)"),
) -> None:
    started = time.time()
    torch.set_num_threads(1)  # the stack's worker gets the other core
    if quick:
        model, seeds, steps, target, train_steps = model or "tiny", min(seeds, 2), min(steps, 6), "12", min(train_steps, 30)
        only = only or "a_text,e_entropy,f_hardness"
    model = model or "fgs-digits"
    work = work.resolve()
    experiment = Experiment(work, seeds, TrainConfig(steps=train_steps), ("--steps", str(steps), "--no-progress" if quick else "--progress"), target, grids)
    experiment.log(f"Digits-LT: {len(experiment.train)} train, {len(experiment.test)} test; real-only CNNs x{seeds} seeds")
    erm = Result(None, "real only, ERM", experiment.fit(experiment.train, "erm"))
    bs = Result(None, "real only, Balanced Softmax", experiment.fit(experiment.train, "balanced_softmax"))
    experiment.log(f"real only: ERM few {erm.mean('few'):.3f}, BS few {bs.mean('few'):.3f}")
    feedback = export_digits_classifier(train_small_cnn(experiment.train, "balanced_softmax", 0, experiment.train_config), work / "classifier")
    hardness = work / "classifier" / "hardness.safetensors"
    variants = ablation_variants(dropout_p, gamma, low_gamma, {"entropy": omega_entropy, "loss": omega_loss, "hardness": omega_hardness})
    variants += omega_variants("" if quick else omega_sweep, dropout_p, gamma)
    wanted = set(only.split(",")) if only else None
    results: list[Result] = []
    stack = start_embedded_stack(work / "stack", model, redis_url=redis_url)
    try:
        run_client(stack, "hardness-stats", "--dataset", "digits-lt", "--root", str(experiment.root), "--classifier", str(feedback[0]),
                   "--spec", str(feedback[1]), "--out", str(hardness), capture=True)
        for variant in variants:
            if wanted is None or variant.name in wanted:
                results.append(experiment.generate(stack, variant, feedback, hardness))
        guided = [r for r in results if r.variant.criterion != "none"] or results
        best = max(guided, key=lambda r: (r.mean("few"), r.mean("overall")))
        for variant in path_variants(best.variant):
            if wanted is None or variant.name in wanted:
                results.append(experiment.generate(stack, variant, feedback, hardness))
    finally:
        stack.stop()
    synthetic = load_synthetic(work / "sets" / best.variant.name)
    budget = []
    for fraction in (0.25, 0.5):
        subset = budget_subset(synthetic, fraction)
        experiment.log(f"budget {fraction:.0%}: {len(subset)} images; retraining x{seeds}")
        budget.append((fraction, len(subset), Result(best.variant, f"{fraction:.0%}", experiment.fit(experiment.train + subset, "balanced_softmax"))))
    budget.append((1.0, best.synthetic, best))
    reduced = quick or wanted is not None or seeds < 10
    header = [
        "# Digits-LT: feedback-guided balancing through the fgs service (paper Table 2, Figure 5, Figure 15 in miniature)", "",
        f"Generated by `bench/digits_lt.py{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{time.time() - started:.0f} s on a shared 2-core CPU.",
        f"{'**REDUCED RUN** (not the full configuration: ' + ('--quick, ' if quick else '') + (f'variants {only}, ' if wanted else '') + f'{seeds} seeds). ' if reduced else ''}"
        f"Model `{model}`, {steps} DDIM steps, balance target `{target}` per class, γ={gamma}, dropout p={dropout_p}; "
        f"SmallCNN width {experiment.train_config.width}, {train_steps} AdamW steps, batch {experiment.train_config.batch_size}, seeds 0..{seeds - 1}. "
        "Feedback classifier: the seed-0 real-only Balanced Softmax CNN. One synthetic set per variant (generation seed 0); "
        "seeds vary the classifier training only; paired differences are against the real-only Balanced Softmax CNN of the same seed. "
        f"Shot groups: Many > {experiment.thresholds[0]}, Few < {experiment.thresholds[1]} train images. "
        f"Best criterion (highest mean Few among the guided variants): {best.label}. Grids: `{grids.relative_to(REPO) if grids.is_relative_to(REPO) else grids}/<variant>.png` "
        "(per class: real top row, synthetic below).",
        "",
        "What these numbers say, and what was tried: `bench/digits_lt_analysis.md` (hand-written for the committed run).",
    ]
    text = render(results, erm, bs, budget, best.variant, header)
    report.write_text(text)
    print(text)
    experiment.log(f"wrote {report} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    typer.run(main)
