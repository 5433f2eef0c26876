"""Digits-LT through the real service and client: the retraining recipe and the generation settings chosen on
validation, two pre-declared comparisons read once on test.

    .venv/bin/python bench/digits_lt.py            # full protocol (writes bench/digits_lt.md and .json)
    .venv/bin/python bench/digits_lt.py --quick    # CI smoke: tiny model, 2 variants, 2 x 2 seeds, minutes

The protocol, fixed before any number of its run was seen (issue 21):
1. Digits-LT (fgs_client.digits_lt): long-tailed train split; validation and test, 40 + 40 per class, disjoint.
2. The feedback classifier: the seed-0 real-only CNN (Balanced Softmax, real counts), exported to the service with
   its hardness statistics.
3. Every variant of VARIANTS (in priority order: the run drops variants from the end, never seeds) balances the
   train split (`fgs-client balance`, target `max`: 415 images) once per generation seed g (the plan seed: other
   conditioning picks, noise and dropout masks).
4. The retraining recipe: every candidate of fgs_client.training.RETRAIN_RECIPES retrains a SmallCNN on real +
   each set of RECIPE_VARIANTS for every classifier seed s; RECIPE_RULE picks one on validation, written to
   <work>/recipe_selection.json before any variant is judged.
5. Every variant is retrained with the chosen recipe; VARIANT_RULE picks the best plain, the best guided and the
   best of all on validation, written to <work>/selection.json before test is read.
6. Test, once (cached in <work>/results/test.json): the two comparisons of COMPARISONS, paired by (g, s), with a
   t-based 95 % interval; the budget curve (25/50/100 % of the balancing count) for best plain and best guided.
7. The pilot sweep's suggestion rule (fgs_client.pilot_sweep) on the ω family: does its pick agree with validation?

Standard errors include the generation noise: the mean over s of each generation seed's accuracy (or paired
difference) is one number per g; the SE is the standard deviation of those G numbers over sqrt(G), with G - 1
degrees of freedom, and the 95 % interval is mean ± t(0.975, G - 1) x SE.
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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image
from scipy import stats

from fgs_classifier.small_cnn import SmallCNN
from fgs_client.digits_lt import CLASS_NAMES, build_digits_lt, generator_indices, shot_group
from fgs_client.pilot_sweep import SettingRow, SweepSetting, suggest_setting
from fgs_client.set_metrics import density_coverage
from fgs_client.training import RETRAIN_RECIPES, RetrainRecipe, load_classifier_archive, retrain_recipe
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
from fgs_lab.variants import Variant

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SHOTS = ("overall", "many", "medium", "few")


# The variants, in priority order (issue 21): a run too short for all drops them from the end, never seeds. The
# guided ones take the `digits` preset's feedback input ("released", fgs_common.presets.DIGITS_CHOICE) unless
# they vary it; one ω per criterion first, then more ω, the other feedback input and the other gradient path.
VARIANTS = (
    Variant("plain_p05", "plain, p=0.5, γ=3", dropout_p=0.5),
    Variant(
        "entropy_w0.03",
        "entropy ω=0.03, p=0.5, γ=3, released input (the digits preset)",
        "entropy",
        0.03,
        dropout_p=0.5,
        feedback_input="released",
    ),
    Variant("loss_w0.03", "loss ω=0.03, p=0.5, γ=3", "loss", 0.03, dropout_p=0.5, feedback_input="released"),
    Variant(
        "hardness_w0.03", "hardness ω=0.03, p=0.5, γ=3", "hardness", 0.03, dropout_p=0.5, feedback_input="released"
    ),
    Variant("entropy_w0.1", "entropy ω=0.1, p=0.5, γ=3", "entropy", 0.1, dropout_p=0.5, feedback_input="released"),
    Variant("entropy_w0.03_x0", "entropy ω=0.03, p=0.5, γ=3, x0 feedback input", "entropy", 0.03, dropout_p=0.5),
    Variant(
        "entropy_w0.03_constant_eps",
        "entropy ω=0.03, p=0.5, γ=3, constant-ε gradient path",
        "entropy",
        0.03,
        dropout_p=0.5,
        feedback_input="released",
        gradient_path="constant_eps",
    ),
)
# The sets the retraining recipe is chosen on, each candidate with the first RECIPE_CLASSIFIER_SEEDS classifier seeds
# (the chosen one then gets all of them). Declared for the 6 Dec 2026 run at 14:31 UTC, before any validation
# number of it was seen: the best plain variant of the last run only (the plan was plain + entropy with 4 seeds,
# but a classifier took 40 s on the machine then, load 17: bench/digits_lt_analysis.md).
RECIPE_VARIANTS = ("plain_p05",)
RECIPE_CLASSIFIER_SEEDS = 2
RECIPE_RULE = (
    "the highest mean validation Few accuracy among the recipes whose mean validation Overall accuracy is not below "
    "real only's (means over the sets of RECIPE_VARIANTS, generation and classifier seeds); if none qualifies, the "
    "highest mean validation Overall"
)
VARIANT_RULE = (
    "with the chosen recipe: the highest mean validation Few accuracy among the variants whose mean validation "
    "Overall accuracy is not below real only's; if none qualifies, the highest mean validation Overall; best plain "
    "and best guided chosen apart by the same rule, the best of all among every variant"
)
# The two comparisons read on test, declared before the run (issue 21): (name, minuend, subtrahend).
COMPARISONS = (
    ("(a) chosen synthetic variant − real only", "best_overall", "real_only"),
    ("(b) best guided − best plain", "best_guided", "best_plain"),
)
# What the 6 Dec 2026 run changed from the plan above, each decided before any validation number of it was seen.
PLAN_CHANGES = (
    "The plan: 7 variants (VARIANTS), 5 generation × 10 classifier seeds each, the recipe chosen on the plain and "
    "entropy sets with 4 classifier seeds per candidate. On the shared 2-core machine (load 11 to 21 from other "
    "work) a 415-image plain set took 204 to 265 s, an entropy set 6 to 11 min, and one classifier 16 to 70 s, so at "
    "14:31 UTC, before any validation number was seen, the run was cut to the first two variants of VARIANTS (plain "
    "p 0.5 γ 3; entropy ω 0.03, the `digits` preset) with all their seeds, and the recipe chosen on the plain sets "
    "with 2 classifier seeds per candidate (RECIPE_VARIANTS, RECIPE_CLASSIFIER_SEEDS). Loss and hardness: not run.",
    "Two earlier starts of the worker ran with two torch threads each and made about 4 images a minute under that "
    "load; with OMP_NUM_THREADS=1 (every start after 14:02 UTC) one worker made about 80. The runtime counts from "
    "the first start, 13:52 UTC; helper processes trained some of the same seeded models in parallel (a saved model "
    "is reused).",
)
# Every earlier read of the images that are now the test split (git log -p -- bench/digits_lt.md), stated in the
# report before this run's comparisons. Until 28 Nov 17:08 there was no validation split: "test" was 80 digits per
# class, the images now divided into validation and test.
TEST_HISTORY = (
    "1. 27 Nov 2026 20:23 UTC (commit d7279af): a reduced run (30 steps, 53 images per set, 4 variants, one "
    "generation seed, 5 classifier seeds) on the old 80-per-class test split, today's validation + test. It chose "
    "the best criterion on those images (entropy ω 0.1); hardness ω 0.1 had Few 31.2 ± 7.0 against real only's "
    "36.9 ± 4.2.",
    "2. 27 Nov 2026 22:33 UTC (commit 9bd5bed): 14 variants at 30 steps and 415 images per set, one generation seed, "
    "20 classifier seeds, on the same 80-per-class split; the prior was the counts of real + synthetic (nearly "
    "uniform: the batches' prior). It picked its best variants on those images and concluded that loss feedback at "
    "ω 0.02 beats the best plain variant by +2.1 ± 0.5 Few points, and that entropy (ω 0.1: Few 73.4) and hardness "
    "(ω 0.1: Few 74.6) hurt against the best plain variant's 80.6.",
    "3. 28 Nov 2026 18:27 UTC (commit a18cdb1): the validation-first protocol (4 variants, 15 steps, 36 images per "
    "set, 3 generation × 10 classifier seeds, Balanced Softmax with the real counts) read test once: best guided "
    "(entropy ω 0.03, released input) − best plain (p 0): **Few +3.8 ± 5.0 (2 df): feedback did not beat the best "
    "plain variant.**",
    "4. 28 Nov 2026 21:12 UTC (commit e35969a): the same protocol rerun with 8 variants read test again: best guided − "
    "best plain (p 0.5) Few +2.6 ± 0.6 (2 df), reported as beyond 2 SE; with 2 df the t-based 95 % interval is "
    "± 4.3 SE, so that read sits on the edge of it. The first read's negative verdict was not carried into the "
    "analysis.",
    "5. The demo (`./scripts/demo.sh`) prints test accuracy for one seed at every run (issue 21 quotes one: real "
    "only 73.2 / Few 30.0; the entropy set with the real-counts prior 64.0 / Few 90.0). It is a display, never a "
    "selection. One such run happened during this run, on 6 Dec 2026 at 14:31 UTC, after the recipe rule was "
    "declared and before it chose (recipe batches_50, one seed: real only 68.8 / Few 14.2, real + 415 entropy images "
    "88.2 / Few 85.0); the rule is mechanical on validation, so it could not be steered by that read.",
    "",
    "This run's test numbers are therefore not a first look at these images: the variants and levers compared here "
    "were shaped by reads 1 to 4. What this run adds is choices made on validation alone, five generation seeds and "
    "t-based intervals. The reports of reads 3 and 4 (the source of the `digits` preset and of the defaults' "
    "Digits-LT numbers in common/fgs_common/presets.py and the README) stay in git: "
    "`git show e35969a:bench/digits_lt.md`.",
)
# The ω family the sweep rule is validated on: same p, γ, scaling and feedback input, ω varied.
OMEGA_FAMILY = ("plain_p05", "entropy_w0.03", "entropy_w0.1")
QUICK_VARIANTS = ("plain_p05", "entropy_w0.1")
FULL_SCALE = {
    "model": "fgs-digits",
    "steps": 30,
    "target": "max",
    "generation_seeds": 5,
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


def t_interval(mean: float, se: float, count: int) -> tuple[float, float, int]:
    """The t-based 95 % interval of a mean whose SE comes from `count` independent numbers, and its df."""
    df = count - 1
    half = float(stats.t.ppf(0.975, df)) * se if df > 0 else math.nan
    return mean - half, mean + half, df


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

    def model_path(self, variant: str, g: int | None, s: int, recipe: str = "") -> Path:
        folder = self.work / "models" / recipe / variant if recipe else self.work / "models" / variant
        return folder / (f"g{g}_s{s}.pt" if g is not None else f"s{s}.pt")

    def fit(self, train: ImageSet, seed: int, recipe: RetrainRecipe, path: Path | None = None) -> SmallCNN:
        model = train_small_cnn(train, seed, self.train_config, recipe)
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
            models = [
                self.fit(self.train, s, RETRAIN_RECIPES[0], self.model_path("real_only", None, s))
                for s in self.classifier_seeds
            ]  # no synthetic image: every recipe trains the same real-only baseline
            result = {"validation": [self.accuracy(m, self.validation) for m in models]}
            self.store("real_only", result)
        return result

    def set_dir(self, variant: Variant, g: int) -> Path:
        return self.work / "sets" / variant.name / f"g{g}"

    def generate(self, stack, variant: Variant, g: int, classifier: tuple[Path, Path, Path]) -> float:
        """Balance the train split with `variant`, plan seed g; seconds taken (0 when already there)."""
        out = self.set_dir(variant, g)
        if (out / "manifest.csv").is_file():
            return 0.0
        started = time.time()
        extra = ("--classifier", str(classifier[0]), "--classifier-spec", str(classifier[1])) if variant.guided else ()
        if variant.criterion == "hardness":
            extra += ("--hardness-stats", str(classifier[2]))
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

    def synthetic_sets(self, variant: Variant, generated: list[Future]) -> list[ImageSet]:
        """The variant's sets, one per generation seed, waiting for their generation; metrics cached once."""
        sets, metrics = [], self.cached(f"sets_{variant.name}")
        feature_model, validation_features = self.features() if metrics is None else (None, None)
        rows = []
        for g, future in zip(self.generation_seeds, generated, strict=False):
            seconds = future.result()
            synthetic = load_synthetic(self.set_dir(variant, g))
            sets.append(synthetic)
            if metrics is None:
                features = feature_model.features(synthetic.images)
                density, coverage = density_coverage(validation_features, features)
                rows.append(
                    {
                        "generation_seed": g,
                        "images": len(synthetic),
                        "generate_s": seconds,
                        "frechet": frechet_distance(validation_features, features),
                        "density": density,
                        "coverage": coverage,
                    }
                )
                self.log(f"{variant.name} g{g}: {len(synthetic)} images ({seconds:.0f} s)")
        if metrics is None:
            self.store(f"sets_{variant.name}", {"sets": rows})
        return sets

    def retrain(
        self, variant: Variant, sets: list[ImageSet], recipe: RetrainRecipe, seeds: int | None = None
    ) -> list[list[dict]]:
        """Validation accuracy [g][s] of `recipe` on real + each set for the first `seeds` classifier seeds (all
        without it); models kept for test; cached, and extended when asked for more seeds."""
        key = f"validation_{recipe.name}_{variant.name}"
        wanted = len(self.classifier_seeds) if seeds is None else min(seeds, len(self.classifier_seeds))
        result = self.cached(key) or [[] for _ in sets]
        if all(len(row) >= wanted for row in result):
            return [row[:wanted] for row in result]
        self.log(
            f"{variant.name} with recipe {recipe.name}: training {len(sets)} x {wanted} (cached: {len(result[0])})"
        )
        for g, synthetic in zip(self.generation_seeds, sets, strict=False):
            for s in range(len(result[g]), wanted):
                path = self.model_path(variant.name, g, s, recipe.name)
                # a model saved by an earlier start (or a helper process) is the same model: training is seeded
                model = self.load_model(path) if path.is_file() else self.fit(self.train + synthetic, s, recipe, path)
                result[g].append(self.accuracy(model, self.validation))
            self.store(key, result)
        return result

    def validate(self, variant: Variant, sets: list[ImageSet], recipe: RetrainRecipe, classifier) -> dict:
        result = {
            "variant": asdict(variant),
            "recipe": recipe.name,
            "validation": self.retrain(variant, sets, recipe),
            "sets": self.cached(f"sets_{variant.name}")["sets"],
        }
        few_key = f"few_classes_{variant.name}"
        if self.cached(few_key) is None:
            self.store(few_key, self.few_class_row(variant, sets, classifier))
        result["few_classes"] = self.cached(few_key)
        mean, se = mean_se(shot_values(result["validation"], "few"))
        self.log(f"{variant.name}: validation Few {mean:.1f} ± {se:.1f} ({recipe.name})")
        return result

    def test_accuracies(self, name: str, test: ImageSet, recipe: RetrainRecipe) -> list[list[dict]] | list[dict]:
        if name == "real_only":
            return [self.accuracy(self.load_model(self.model_path(name, None, s)), test) for s in self.classifier_seeds]
        return [
            [
                self.accuracy(self.load_model(self.model_path(name, g, s, recipe.name)), test)
                for s in self.classifier_seeds
            ]
            for g in self.generation_seeds
        ]

    def budget(self, variant: Variant, fraction: float, test: ImageSet, recipe: RetrainRecipe) -> dict:
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
                row = []
                for s in self.classifier_seeds:
                    path = self.model_path(f"budget{int(100 * fraction)}_{variant.name}", g, s, recipe.name)
                    model = self.load_model(path) if path.is_file() else self.fit(self.train + subset, s, recipe, path)
                    row.append(self.accuracy(model, test))
                result["test"].append(row)
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


def pooled(per_set: list[list[list[dict]]]) -> list[list[dict]]:
    """Accuracies [g][s] of several variants' sets as one list per generation seed (their mean is the mean over
    variants, generation and classifier seeds; the SE stays over generation seeds)."""
    return [sum((variant[g] for variant in per_set), []) for g in range(min(len(v) for v in per_set))]


def by_rule(candidates: dict[str, list[list[dict]]], real_overall: float) -> str | None:
    """RECIPE_RULE and VARIANT_RULE: the highest mean validation Few among the candidates whose mean validation
    Overall is not below real only's; if none qualifies, the highest mean validation Overall."""
    if not candidates:
        return None
    few = {name: mean_se(shot_values(acc, "few"))[0] for name, acc in candidates.items()}
    overall = {name: mean_se(shot_values(acc, "overall"))[0] for name, acc in candidates.items()}
    qualifying = [name for name in candidates if overall[name] >= real_overall]
    if qualifying:
        return max(qualifying, key=lambda name: (few[name], overall[name]))
    return max(candidates, key=lambda name: overall[name])


def select_recipe(recipes: dict[str, dict[str, list[list[dict]]]], real: dict) -> dict:
    """RECIPE_RULE on the validation accuracies recipes[recipe][variant]; written before any variant is judged."""
    real_overall = real_only_se(real["validation"], "overall")[0]
    chosen = by_rule({name: pooled(list(per_variant.values())) for name, per_variant in recipes.items()}, real_overall)
    return {
        "rule": RECIPE_RULE,
        "recipe": chosen,
        "candidates": list(recipes),
        "sets": sorted({v for per_variant in recipes.values() for v in per_variant}),
        "real_only_overall": real_overall,
        "chosen_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def select(variants: list[Variant], results: dict[str, dict]) -> dict:
    """VARIANT_RULE on validation: best plain, best guided, best of all; written before test is read."""
    real_overall = real_only_se(results["real_only"]["validation"], "overall")[0]

    def pick(group: list[Variant]) -> str | None:
        return by_rule({v.name: results[v.name]["validation"] for v in group if v.name in results}, real_overall)

    return {
        "rule": VARIANT_RULE,
        "best_plain": pick([v for v in variants if not v.guided]),
        "best_guided": pick([v for v in variants if v.guided]),
        "best_overall": pick(variants),  # the `digits` preset (common/fgs_common/presets.py)
        "comparisons": [f"{name}: test Few and Overall, paired by (g, s)" for name, _, _ in COMPARISONS],
        "chosen_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def fmt(mean_and_se: tuple[float, float], signed: bool = False) -> str:
    mean, se = mean_and_se
    if math.isnan(mean):
        return "—"
    return (f"{mean:+.1f}" if signed else f"{mean:.1f}") + (f" ± {se:.1f}" if not math.isnan(se) else "")


def comparison_rows(test: dict, selection: dict) -> list[dict]:
    """COMPARISONS on test: per shot the paired mean, SE, df and t-based 95 % interval."""
    rows = []
    for name, minuend, subtrahend in COMPARISONS:
        a = selection.get(minuend)
        b = "real_only" if subtrahend == "real_only" else selection.get(subtrahend)
        if not a or not b or a not in test or b not in test:
            continue
        row = {"comparison": name, "minuend": a, "subtrahend": b}
        for shot in ("few", "overall", "many", "medium"):
            mean, se = paired(test[a], test[b], shot)
            low, high, df = t_interval(mean, se, len(test[a]))
            row[shot] = {"mean": mean, "se": se, "df": df, "low": low, "high": high}
        rows.append(row)
    return rows


def interval_text(cell: dict) -> str:
    return f"{cell['mean']:+.1f} ± {cell['se']:.1f} [{cell['low']:+.1f}, {cell['high']:+.1f}]"


def render(
    args: dict,
    variants: list[Variant],
    results: dict,
    recipes: dict,
    recipe_choice: dict | None,
    selection: dict | None,
    test: dict,
    rule: dict | None,
    runtime: dict,
) -> str:
    by_name = {v.name: v for v in variants}
    missing = [v.name for v in variants if v.name not in results]
    scaled = [f"{name} {args[name]} (full: {full})" for name, full in FULL_SCALE.items() if args[name] != full]
    left_out = [v.name for v in VARIANTS if v not in variants]
    g_count = args["generation_seeds"]
    lines = [
        "# Digits-LT: the retraining recipe and the settings chosen on validation, two comparisons on test",
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
            + (f"Variants of VARIANTS left out: {', '.join(left_out)}. " if left_out and not args["quick"] else "")
            + (f"Variants not run: {', '.join(missing)}. " if missing else "")
            + ("Test phase not run. " if not test else ""),
        ]
    lines += [
        "",
        "## Protocol (fixed before the run)",
        f"- Model `{args['model']}`, {args['steps']} DDIM steps, balance target `{args['target']}` per class, "
        "16 images per job; every generation parameter passed explicitly (the defaults do not enter).",
        f"- {g_count} generation seeds per variant (plan seeds 0..{g_count - 1}: other conditioning picks, noise and "
        f"dropout masks) × {args['classifier_seeds']} classifier seeds (SmallCNN width 16, {args['train_steps']} "
        "AdamW steps, batch 32).",
        "- Retraining recipe candidates (`fgs_client.training.RETRAIN_RECIPES`): "
        + "; ".join(f"`{r.name}`: {r.description}" for r in RETRAIN_RECIPES)
        + ". Real only is the same under all: instance-sampled batches, Balanced Softmax with the real counts.",
        f"- Recipe rule (on the sets of {', '.join(RECIPE_VARIANTS)}, classifier seeds 0.."
        f"{RECIPE_CLASSIFIER_SEEDS - 1}): {RECIPE_RULE}.",
        f"- Variant rule: {VARIANT_RULE}.",
        "- Splits: validation 40/class and test 40/class, disjoint, seeded (`digits_lt.json`). Every choice is made "
        "on validation; test is read once, after both selections are written.",
        "- Feedback classifier: the seed-0 real-only CNN (with its hardness statistics for the hardness criterion). "
        "Shot groups: Many > 20, Few < 6 train images.",
        "- ± is the SE over generation seeds of the per-generation-seed mean (over classifier seeds), so it includes "
        f"the generation noise; {g_count - 1} degrees of freedom; [low, high] is the t-based 95 % interval "
        f"(t(0.975, {g_count - 1}) = {float(stats.t.ppf(0.975, max(g_count - 1, 1))):.2f}).",
        "- Pre-declared test comparisons, paired by (generation seed, classifier seed), Few and Overall: "
        + "; ".join(name for name, _, _ in COMPARISONS)
        + ". An effect is claimed only where its 95 % interval excludes 0.",
        *(f"- Changed for this run: {change}" for change in PLAN_CHANGES if not args["quick"]),
        "",
        "## Earlier reads of the test split (before this run)",
        "",
        *TEST_HISTORY,
        "",
        "## The retraining recipe (validation, accuracy %, mean ± SE)",
        "",
    ]
    real = results.get("real_only")
    real_cells = [fmt(real_only_se(real["validation"], s)) for s in SHOTS] if real else ["—"] * 4
    if recipes:
        lines += [
            f"Each recipe retrains on real + the sets of {', '.join(sorted({v for r in recipes.values() for v in r}))} "
            "(pooled: the mean over both variants, generation and classifier seeds).",
            "",
            "| recipe | Overall | Many | Medium | Few | Overall not below real only |",
            "|---|---:|---:|---:|---:|---|",
            "| real only (no synthetic) | " + " | ".join(real_cells) + " | — |",
        ]
        real_overall = real_only_se(real["validation"], "overall")[0]
        for name, per_variant in recipes.items():
            acc = pooled(list(per_variant.values()))
            overall = mean_se(shot_values(acc, "overall"))[0]
            mark = " **(chosen)**" if recipe_choice and recipe_choice["recipe"] == name else ""
            lines.append(
                f"| `{name}`{mark} | "
                + " | ".join(fmt(mean_se(shot_values(acc, s))) for s in SHOTS)
                + f" | {'yes' if overall >= real_overall else 'no'} |"
            )
        if recipe_choice:
            lines += [
                "",
                f"Chosen: **`{recipe_choice['recipe']}`** ({retrain_recipe(recipe_choice['recipe']).description}); "
                f"recorded at {recipe_choice['chosen_at']} in `recipe_selection.json`, before any variant was judged.",
            ]
    else:
        lines.append("Not run.")
    lines += [
        "",
        "## Variants with the chosen recipe (validation, accuracy %, mean ± SE)",
        "",
        "| variant | Overall | Many | Medium | Few | Δ Few vs real only | Fréchet ↓ | density | coverage "
        "| generation (s per set) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if real:
        lines.append("| real only (Balanced Softmax) | " + " | ".join(real_cells) + " | — | — | — | — | — |")
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
        "classifier's feature space (trained on generator digits only), averaged over generation seeds. "
        "Generation seconds are wall time on the shared machine (0: a set made by an earlier start of the run).",
        "",
        "## Selection (validation only; written before test was read)",
        "",
    ]
    if selection:
        for key, text in (
            ("best_plain", "Best plain"),
            ("best_guided", "Best guided"),
            ("best_overall", "Best of all"),
        ):
            lines.append(
                f"- {text}: **{by_name[selection[key]].label}**." if selection[key] else f"- {text}: none ran."
            )
        lines.append(f"- Recorded at {selection['chosen_at']} in `selection.json` (and `bench/digits_lt.json`).")
    else:
        lines.append("Not made: the validation sweep did not finish.")
    lines += ["", "## Test (read once): the two pre-declared comparisons", ""]
    comparisons = comparison_rows(test, selection) if test and selection else []
    if comparisons:
        lines += [
            "Paired by (g, s); mean ± SE [95 % interval], df = "
            f"{comparisons[0]['few']['df']}. Read an effect only where the interval excludes 0.",
            "",
            "| comparison (test) | Δ Few | Δ Overall | Δ Many | Δ Medium |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in comparisons:
            label = f"{row['comparison']}: {by_name[row['minuend']].label} − " + (
                "real only" if row["subtrahend"] == "real_only" else by_name[row["subtrahend"]].label
            )
            lines.append(
                f"| {label} | " + " | ".join(interval_text(row[s]) for s in ("few", "overall", "many", "medium")) + " |"
            )
        lines.append("")
        for row in comparisons:
            verdicts = []
            for shot in ("few", "overall"):
                cell = row[shot]
                there = cell["low"] > 0 or cell["high"] < 0
                direction = "higher" if cell["mean"] > 0 else "lower"
                verdicts.append(
                    f"{shot.capitalize()} {direction} by {abs(cell['mean']):.1f} points (95 % interval excludes 0)"
                    if there
                    else f"**no {shot.capitalize()} effect shown** (95 % interval includes 0)"
                )
            lines.append(f"- {row['comparison']}: " + "; ".join(verdicts) + ".")
        lines += [
            "",
            "| training set (test accuracy %) | Overall | Many | Medium | Few |",
            "|---|---:|---:|---:|---:|",
            "| real only (Balanced Softmax) | "
            + " | ".join(fmt(real_only_se(test["real_only"], s)) for s in SHOTS)
            + " |",
        ]
        for name in dict.fromkeys(selection[k] for k in ("best_plain", "best_guided", "best_overall")):
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
        "## Budget curve on test (paper Figure 5 right / Figure 15): accuracy % against the synthetic share",
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
        zero = fmt(real_only_se(test["real_only"], "few")), fmt(real_only_se(test["real_only"], "overall"))
        lines.append("| 0% | " + " | ".join(f"0 | {zero[0]} | {zero[1]}" for _ in budget) + " |")
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
    generation_seeds: int = typer.Option(5, help="plan seeds per variant"),
    classifier_seeds: int = typer.Option(10, help="classifier training seeds per generation seed"),
    steps: int = typer.Option(30, help="DDIM steps per image"),
    target: str = typer.Option("max", help="balance target per class ('max' = 60)"),
    train_steps: int = typer.Option(200, help="optimizer steps per classifier"),
    variants: str = typer.Option(None, help="comma-separated variants (default: all of VARIANTS)"),
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
    chosen = [v for v in VARIANTS if variants is None or v.name in variants.split(",")]
    experiment = Experiment(work.resolve(), args)
    experiment.log(
        f"Digits-LT: {len(experiment.train)} train, {len(experiment.validation)} validation; "
        f"{len(chosen)} variants x {generation_seeds} generation seeds x {classifier_seeds} classifier seeds"
    )
    feedback = export_digits_classifier(
        train_small_cnn(experiment.train, 0, experiment.train_config), experiment.work / "classifier"
    )
    feedback_classifier = load_classifier_archive(
        feedback[0], ClassifierSpec.model_validate_json(feedback[1].read_text())
    )
    hardness = experiment.work / "classifier" / "hardness_stats.safetensors"
    results: dict[str, dict] = {"real_only": experiment.real_only()}
    recipe_variants = [v for v in chosen if v.name in (QUICK_VARIANTS if quick else RECIPE_VARIANTS)]
    recipes: dict[str, dict[str, list[list[dict]]]] = {}
    stack = None
    if any(not (experiment.set_dir(v, g) / "manifest.csv").is_file() for v in chosen for g in range(generation_seeds)):
        stack = start_embedded_stack(experiment.work / "stack", args["model"], workers=workers, redis_url=redis_url)
        if not hardness.is_file():
            run_client(
                stack,
                "hardness-stats",
                "--dataset",
                "digits-lt",
                "--root",
                str(experiment.root),
                "--classifier",
                str(feedback[0]),
                "--spec",
                str(feedback[1]),
                "--out",
                str(hardness),
                capture=True,
            )
    try:
        # Generation runs in a thread (the work happens in the stack's worker process) while this one trains;
        # sets are made in the order of VARIANTS, the recipe's sets first.
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            futures = {
                v.name: [
                    pool.submit(experiment.generate, stack, v, g, (*feedback, hardness))
                    for g in experiment.generation_seeds
                ]
                for v in recipe_variants + [v for v in chosen if v not in recipe_variants]
            }
            sets = {}
            for v in recipe_variants:  # trains on one variant's sets while the next one's are generated
                sets[v.name] = experiment.synthetic_sets(v, futures[v.name])
                for recipe in RETRAIN_RECIPES:
                    recipes.setdefault(recipe.name, {})[v.name] = experiment.retrain(
                        v, sets[v.name], recipe, RECIPE_CLASSIFIER_SEEDS
                    )
            recipe_path = experiment.work / "recipe_selection.json"
            if not recipe_path.is_file():
                recipe_path.write_text(json.dumps(select_recipe(recipes, results["real_only"]), indent=1))
            recipe_choice = json.loads(recipe_path.read_text())
            recipe = retrain_recipe(recipe_choice["recipe"])
            experiment.log(f"recipe chosen on validation, before any variant is judged: {recipe.name}")
            for v in chosen:
                variant_sets = sets.get(v.name) or experiment.synthetic_sets(v, futures[v.name])
                results[v.name] = experiment.validate(v, variant_sets, recipe, feedback_classifier)
                sets.pop(v.name, None)  # memory: 415 images x 5 seeds per variant
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
        test = experiment.cached("test") or {}
        if not test:
            test_split = load_split(experiment.root, "test")
            for name in {"real_only", *(selection[k] for k in ("best_plain", "best_guided", "best_overall"))}:
                if name:
                    test[name] = experiment.test_accuracies(name, test_split, recipe)
            experiment.store("test", test)
        test["budget"] = {}
        for name in (selection["best_plain"], selection["best_guided"]):
            if name:
                variant = next(v for v in chosen if v.name == name)
                curve = {}
                for fraction in (0.25, 0.5):  # with --no-budget, only the points already cached
                    point = (
                        experiment.budget(variant, fraction, load_split(experiment.root, "test"), recipe)
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
    text = render(args, chosen, results, recipes, recipe_choice, selection, test, rule, runtime)
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
    # The `digits` preset (common/fgs_common/presets.py) is the best guided variant on validation (a preset for
    # feedback; whether feedback beats plain sampling is comparison (b)); a run without a guided variant carries the
    # previous choice forward.
    previous = json.loads(report.with_suffix(".json").read_text()) if report.with_suffix(".json").is_file() else {}
    if summary["best_guided"] is not None or not previous:
        chosen_preset = summary["best_guided"] or summary["best_overall"] or {}
        summary["preset_selection"] = dict(chosen_preset, source=f"this run ({runtime['finished']})")
    else:
        summary["preset_selection"] = previous.get("preset_selection") or dict(
            previous["best_overall"], source=f"the run of {previous['runtime']['finished']}"
        )
    summary["recipe_selection"] = recipe_choice
    summary["comparisons"] = comparison_rows(test, selection) if test else []
    report.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(text)
    experiment.log(f"wrote {report} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    typer.run(main)
