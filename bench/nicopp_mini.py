"""Group shift in miniature: the paper's NICO++ experiment (section 3, Table 1) on Digits-Contexts.

    .venv/bin/python bench/nicopp_mini.py generator   # the generator's class/context table (its model card's)
    .venv/bin/python bench/nicopp_mini.py run         # the experiment (writes bench/nicopp_mini.md and .json)
    .venv/bin/python bench/nicopp_mini.py run --quick --model tiny   # CI smoke: seconds, numbers meaningless

The protocol, fixed before any number was seen:
1. Digits-Contexts (`fgs-client digits-contexts`): train group-imbalanced (24, 8, 3, 1, 0, 0 per class over its
   contexts, 20 empty groups, each context the main one of one or two classes); validation 6 and test 10 per
   group, disjoint; the generator `fgs-digits-contexts` trained on other digits only.
2. Retraining recipe: the project's (`fgs_lab.digits_classifier.train_small_cnn`: SmallCNN width 16, AdamW,
   one-cycle, Balanced Softmax with the real class counts, 50/50 real/synthetic class-balanced batches), with
   `--train-steps` steps (800: chosen on real-only validation, see bench/nicopp_mini.md).
3. The feedback classifier: the seed-0 real-only model, exported as the service takes it.
4. Every variant balances the train split as `fgs-client balance --dataset nico++ --target T --seed g` plans it
   (other-groups conditioning for empty groups, prompts "class in context"), once per generation seed g, and a
   SmallCNN is retrained on real + synthetic per classifier seed s. Validation only.
5. Selection on validation: highest mean worst-group accuracy (ties: average accuracy), plain and guided apart.
   Written to <work>/selection.json before test is read.
6. Test, once, for ONE pre-declared comparison: best guided - best plain on worst-group accuracy, paired by (g, s).
   The SE is over generation seeds (each g's mean over s; G - 1 degrees of freedom), the interval t-based.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image, ImageDraw

from fgs_classifier.registry import load_classifier
from fgs_client.digits_contexts import CONTEXTS, METADATA_FILE, TRAIN_PROFILE, build_digits_contexts, train_count
from fgs_client.digits_lt import CLASS_NAMES
from fgs_lab.digits_classifier import TrainConfig, export_digits_classifier, train_small_cnn
from fgs_lab.nicopp_mini import (
    GroupedSet,
    accuracy_by_group,
    class_and_context,
    context_evaluator,
    group_id,
    read_part,
    read_train,
    synthetic_set,
)
from fgs_lab.variants import Variant
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import load_pipeline

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
app = typer.Typer(add_completion=False, no_args_is_help=True)

VARIANTS = (
    Variant("plain_text", "plain, text only, γ=3", text_only=True),
    Variant("plain_p0", "plain, text + image, p=0, γ=3"),
    Variant("plain_p05", "plain, text + image, dropout p=0.5, γ=3", dropout_p=0.5),
    Variant(
        "entropy",
        "entropy ω=0.03, p=0.5, γ=3, released input",
        "entropy",
        0.03,
        dropout_p=0.5,
        feedback_input="released",
    ),
    Variant("loss", "loss ω=0.03, p=0.5, γ=3, released input", "loss", 0.03, dropout_p=0.5, feedback_input="released"),
)
QUICK_VARIANTS = ("plain_p05", "entropy")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def t_interval(values: list[float]) -> tuple[float, float, int, float, float]:
    """Mean, SE, df and the t-based 95 % interval of `values` (one per generation seed)."""
    from scipy.stats import t

    array = np.asarray(values, float)
    mean, df = float(array.mean()), len(array) - 1
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if df > 0 else float("nan")
    half = float(t.ppf(0.975, df) * se) if df > 0 else float("nan")
    return mean, se, df, mean - half, mean + half


def per_seed_means(table: dict[tuple[int, int], float]) -> list[float]:
    """{(g, s): value} -> the mean over s of each g."""
    seeds = sorted({g for g, _ in table})
    return [float(np.mean([v for (g, _), v in table.items() if g == seed])) for seed in seeds]


def contact_sheet(
    real: GroupedSet,
    sets: dict[str, list[Image.Image]],
    set_groups: dict[str, list[int]],
    class_index: int,
    path: Path,
    per_row: int = 8,
) -> None:
    """One class: per context a block of a real row then a row per variant (generation seed 0)."""
    cell, label_w = 34, 150
    rows = 1 + len(sets)
    sheet = Image.new("RGB", (label_w + per_row * cell, len(CONTEXTS) * (rows * cell + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for block, context in enumerate(CONTEXTS):
        gid = group_id(class_index, context)
        top = block * (rows * cell + 8)
        real_images = [real.images.images[i] for i in torch.nonzero(real.groups == gid).flatten().tolist()]
        lines = [
            (
                f"{CLASS_NAMES[class_index]}/{context} real ({len(real_images)})",
                [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for img in real_images],
            )
        ]
        for name, pictures in sets.items():
            lines.append((name, [p for p, g in zip(pictures, set_groups[name], strict=True) if g == gid]))
        for r, (label, pictures) in enumerate(lines):
            draw.text((2, top + r * cell + 10), label, fill="black")
            for k, picture in enumerate(pictures[:per_row]):
                sheet.paste(picture, (label_w + k * cell, top + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


@app.command()
def generator(
    model: str = typer.Option("fgs-digits-contexts"),
    root: Path = typer.Option(REPO / "out" / "nicopp-mini", help="the miniature (built if absent)"),
    per_group: int = typer.Option(4, help="samples per group and mode"),
    steps: int = typer.Option(20),
    threads: int = typer.Option(1),
    out: Path = typer.Option(BENCH / "fgs_digits_contexts.json"),
    wait_for_model: bool = typer.Option(False, help="fit the evaluator, then wait for a training run to save MODEL"),
) -> None:
    """Share of samples whose class and context a real-only digit + context classifier recognises: text only
    (every group) and text + image (conditioned on a train image of the same group; the 40 non-empty groups)."""
    torch.set_num_threads(threads)
    if not (root / METADATA_FILE).is_file():
        build_digits_contexts(root)
    start = time.perf_counter()
    evaluator = context_evaluator()
    validation = read_part(root, "validation")
    cls, ctx = class_and_context(evaluator, validation.images.images)
    truth_c, truth_x = validation.groups.numpy() // 6, validation.groups.numpy() % 6
    evaluator_acc = {"class": float((cls == truth_c).mean()), "context": float((ctx == truth_x).mean())}
    log(f"evaluator on real validation: {evaluator_acc}")
    while wait_for_model and not (Path(model) / "training.json").is_file():  # written last by the trainer
        time.sleep(10)
    sampler = GuidedDDIMSampler(load_pipeline(model, device="cpu"))
    dataset, train = read_train(root)
    variant = {"text only": Variant("text", "text only", text_only=True), "text + image": Variant("p0", "p=0")}
    results, pictures_by_mode = {}, {}
    for mode, v in variant.items():
        target = {
            f"{CLASS_NAMES[c]}/{g}": n + per_group
            for (c, g), n in dataset.unit_counts().items()
            if mode == "text only" or n > 0
        }
        generated, pictures = synthetic_set(sampler, dataset, target, v, seed=0, steps=steps, guidance_every=steps)
        # "other groups" entries of text + image are excluded above: every conditioning image is of its own group
        cls, ctx = class_and_context(evaluator, generated.images.images)
        gc, gx = generated.groups.numpy() // 6, generated.groups.numpy() % 6
        per_class = {
            CLASS_NAMES[c]: float(((cls == gc) & (gc == c)).sum() / max(1, (gc == c).sum())) for c in range(10)
        }
        per_context = {CONTEXTS[x]: float(((ctx == gx) & (gx == x)).sum() / max(1, (gx == x).sum())) for x in range(6)}
        results[mode] = {
            "samples": len(gc),
            "class": float((cls == gc).mean()),
            "context": float((ctx == gx).mean()),
            "both": float(((cls == gc) & (ctx == gx)).mean()),
            "class_by_class": per_class,
            "context_by_context": per_context,
        }
        pictures_by_mode[mode] = (pictures, generated.groups.tolist())
        log(f"{mode}: {results[mode]['class']:.3f} class, {results[mode]['context']:.3f} context")
    record = {
        "model": model,
        "steps": steps,
        "guidance_scale": 3.0,
        "per_group": per_group,
        "seed": 0,
        "evaluator": "60-way MLP (16x16 thumbnails) on generator-split digits drawn afresh in every context "
        "(real drawings only)",
        "evaluator_on_validation": evaluator_acc,
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.write_text(json.dumps(record, indent=1))
    # a sheet to look at: per context, row 1 text only, row 2 text + image, for classes zero .. nine
    sheet = Image.new("RGB", (10 * 34, len(CONTEXTS) * 2 * 34 + len(CONTEXTS) * 6), "white")
    for x, context in enumerate(CONTEXTS):
        for r, mode in enumerate(("text only", "text + image")):
            pictures, groups = pictures_by_mode[mode]
            for c in range(10):
                hit = [p for p, g in zip(pictures, groups, strict=True) if g == group_id(c, context)]
                if hit:
                    sheet.paste(hit[0], (c * 34, x * (68 + 6) + r * 34))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


@app.command()
def run(
    root: Path = typer.Option(REPO / "out" / "nicopp-mini", help="the miniature (built if absent)"),
    work: Path = typer.Option(REPO / "out" / "nicopp-mini-bench"),
    model: str = typer.Option("fgs-digits-contexts"),
    target: int = typer.Option(
        24,
        help="every group up to this many images (24: the largest group, the paper's"
        " 'every group to 811' in miniature)",
    ),
    steps: int = typer.Option(15, help="DDIM steps (the preset: 30)"),
    guidance_every: int = typer.Option(3, help="feedback every k steps (the preset: 5 of 30)"),
    generation_seeds: int = typer.Option(3),
    classifier_seeds: int = typer.Option(10),
    selection_seeds: int = typer.Option(
        3,
        help="classifier seeds per (variant, generation seed) on validation; the two chosen variants then get all"
        " --classifier-seeds (the CPU cost: bench/nicopp_mini.md)",
    ),
    train_steps: int = typer.Option(800),
    variants: str = typer.Option(",".join(v.name for v in VARIANTS)),
    threads: int = typer.Option(1),
    quick: bool = typer.Option(False, help="CI smoke: 2 variants, 2 x 2 seeds, target 2, 2 steps, 20 train steps"),
    report: Path = typer.Option(BENCH / "nicopp_mini.md"),
) -> None:
    """The experiment: validation for every variant, selection, then the one test comparison."""
    torch.set_num_threads(threads)
    if quick:
        target, steps, guidance_every, generation_seeds, classifier_seeds, train_steps = 2, 2, 1, 2, 2, 20
        selection_seeds = 1
        variants = ",".join(QUICK_VARIANTS)
    chosen = [v for v in VARIANTS if v.name in variants.split(",")]
    config = TrainConfig(steps=train_steps)
    started = time.perf_counter()
    if not (root / METADATA_FILE).is_file():
        build_digits_contexts(root)
    work.mkdir(parents=True, exist_ok=True)
    dataset, train = read_train(root)
    validation = read_part(root, "validation")

    def fit(data: GroupedSet, seed: int):
        return train_small_cnn(data.images, seed, config)  # the one recipe (fgs_client.training.RETRAIN_RECIPE)

    log("real only")
    models = {("real", 0, s): fit(train, s) for s in range(classifier_seeds)}
    val = {
        "real": {(0, s): asdict(accuracy_by_group(models[("real", 0, s)], validation)) for s in range(classifier_seeds)}
    }
    archive, spec_path = export_digits_classifier(models[("real", 0, 0)], work / "feedback")
    from fgs_common.wire import ClassifierSpec

    feedback = load_classifier(archive, ClassifierSpec.model_validate_json(spec_path.read_text()))
    sampler = GuidedDDIMSampler(load_pipeline(model, device="cpu"))
    seconds: dict[str, float] = {}
    pictures: dict[str, tuple[list[Image.Image], list[int]]] = {}
    sets: dict[tuple[str, int], GroupedSet] = {}
    selection_seeds = min(selection_seeds, classifier_seeds)

    def validate(name: str, g: int, seeds: range) -> None:
        for s in seeds:
            models[(name, g, s)] = fit(train + sets[(name, g)], s)
            val[name][(g, s)] = asdict(accuracy_by_group(models[(name, g, s)], validation))
        (work / "validation_so_far.json").write_text(
            json.dumps({n: {f"{g},{s}": r for (g, s), r in t.items()} for n, t in val.items()}, indent=1)
        )

    for variant in chosen:
        val[variant.name] = {}
        begin = time.perf_counter()
        for g in range(generation_seeds):
            generated, images = synthetic_set(
                sampler, dataset, target, variant, g, steps, guidance_every, classifier=feedback
            )
            sets[(variant.name, g)] = generated
            if g == 0:
                pictures[variant.name] = (images, generated.groups.tolist())
            validate(variant.name, g, range(selection_seeds))
            log(
                f"{variant.name} g{g}: {len(generated.groups)} images, validation WGA "
                f"{np.mean([val[variant.name][(g, s)]['worst_group'] for s in range(selection_seeds)]):.3f}"
            )
        seconds[variant.name] = round(time.perf_counter() - begin, 1)

    def summary(name: str, metric: str) -> tuple[float, float]:
        means = per_seed_means({k: v[metric] for k, v in val[name].items()})
        mean, se, *_ = t_interval(means) if len(means) > 1 else (means[0], float("nan"))
        return mean, se

    def best(candidates: list[Variant]) -> str | None:
        if not candidates:
            return None
        return max((v.name for v in candidates), key=lambda n: (summary(n, "worst_group")[0], summary(n, "overall")[0]))

    selection = {
        "rule": "highest mean validation worst-group accuracy, ties by average accuracy; plain and guided apart",
        "best_plain": best([v for v in chosen if not v.guided]),
        "best_guided": best([v for v in chosen if v.guided]),
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (work / "selection.json").write_text(json.dumps(selection, indent=1))
    log(f"selection (validation only): {selection}")
    for name in (selection["best_plain"], selection["best_guided"]):
        for g in range(generation_seeds if name else 0):
            validate(name, g, range(selection_seeds, classifier_seeds))  # the rest of the seeds, for the test
        log(f"{name}: {classifier_seeds} classifier seeds trained")

    # Test, read once: real only, best plain, best guided.
    test = read_part(root, "test")
    test_results: dict[str, dict[tuple[int, int], dict]] = {}
    for name in ("real", selection["best_plain"], selection["best_guided"]):
        if name is None:
            continue
        test_results[name] = {
            (g, s): asdict(accuracy_by_group(model_, test)) for (n, g, s), model_ in models.items() if n == name
        }
    comparison = None
    if selection["best_plain"] and selection["best_guided"]:
        guided, plain = test_results[selection["best_guided"]], test_results[selection["best_plain"]]
        differences = {k: guided[k]["worst_group"] - plain[k]["worst_group"] for k in guided}
        mean, se, df, low, high = t_interval(per_seed_means(differences))
        comparison = {
            "metric": "test worst-group accuracy, best guided - best plain, paired by (g, s)",
            "mean": mean,
            "se": se,
            "df": df,
            "ci95": [low, high],
            "per_generation_seed": per_seed_means(differences),
        }
        log(f"test comparison: {comparison}")

    for class_index in range(len(CLASS_NAMES)):
        contact_sheet(
            train,
            {n: p for n, (p, _) in pictures.items()},
            {n: g for n, (_, g) in pictures.items()},
            class_index,
            work / "grids" / f"{CLASS_NAMES[class_index]}.png",
        )
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "scale": {
            "model": model,
            "target": target,
            "steps": steps,
            "guidance_every": guidance_every,
            "generation_seeds": generation_seeds,
            "classifier_seeds": classifier_seeds,
            "selection_seeds": selection_seeds,
            "train_steps": train_steps,
            "quick": quick,
        },
        "variants": {v.name: asdict(v) for v in chosen},
        "validation": {name: {f"{g},{s}": r for (g, s), r in table.items()} for name, table in val.items()},
        "selection": selection,
        "test": {name: {f"{g},{s}": r for (g, s), r in table.items()} for name, table in test_results.items()},
        "comparison": comparison,
        "generation_seconds": seconds,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    (work / "nicopp_mini.json").write_text(json.dumps(record, indent=1, default=str))
    write_report(record, val, test_results, chosen, report if not quick else work / "nicopp_mini.md")
    log(f"done in {record['runtime_s']} s")


def mean_and_se(table: dict[tuple[int, int], float]) -> tuple[float, float]:
    """Mean ± SE over generation seeds (each g's mean over s); with one g (real only), over its classifier seeds."""
    means = per_seed_means(table)
    if len(means) > 1:
        mean, se, *_ = t_interval(means)
        return mean, se
    values = list(table.values())
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def by_train_count(test_results: dict[str, dict[tuple[int, int], dict]], labels: dict[str, str]) -> list[str]:
    """Descriptive (not pre-declared): test accuracy by the group's number of real training images, and how many
    of the 60 groups sit at 0 % (mean over runs)."""
    counts = sorted(set(TRAIN_PROFILE))
    groups_of = {
        n: [group_id(c, x) for c in range(len(CLASS_NAMES)) for x in CONTEXTS if train_count(c, x) == n] for n in counts
    }
    header = " | ".join(f"{n} ({len(groups_of[n])} groups)" if n == 0 else str(n) for n in counts)
    groups = len(CONTEXTS) * len(CLASS_NAMES)
    lines = [
        f"| test accuracy by the group's train count | {header} | groups at 0 % (of {groups}) |",
        "|---|" + "---:|" * (len(counts) + 1),
    ]
    for name, table in test_results.items():
        # per_group's keys are ints as measured and strings as read back from the JSON record
        per_group = {k: {int(group): a for group, a in r["per_group"].items()} for k, r in table.items()}
        cells = []
        for n in counts:
            mean, se = mean_and_se(
                {k: float(np.mean([accuracy[group] for group in groups_of[n]])) for k, accuracy in per_group.items()}
            )
            cells.append(f"{100 * mean:.1f} ± {100 * se:.1f}")
        at_zero = np.mean([sum(1 for a in accuracy.values() if a == 0) for accuracy in per_group.values()])
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + f" | {at_zero:.1f} |")
    return lines


def write_report(record, val, test_results, chosen, path: Path) -> None:
    def cell(table, metric):
        mean, se = mean_and_se({k: v[metric] for k, v in table.items()})
        return f"{100 * mean:.1f} ± {100 * se:.1f}"

    labels = {"real": "real only"} | {v.name: v.label for v in chosen}
    lines = [
        "| variant | (g, s) pairs on validation | validation WGA | validation average | test WGA | test average |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, table in val.items():
        test = test_results.get(name)
        lines.append(
            f"| {labels[name]} | {len(table)} | {cell(table, 'worst_group')} | {cell(table, 'overall')} | "
            f"{cell(test, 'worst_group') if test else '—'} | {cell(test, 'overall') if test else '—'} |"
        )
    comparison = record["comparison"]
    if comparison:
        lines += [
            "",
            f"Pre-declared test comparison ({comparison['metric']}): **{100 * comparison['mean']:+.1f}** points, "
            f"SE {100 * comparison['se']:.1f} over {comparison['df'] + 1} generation seeds (df {comparison['df']}), "
            f"95 % t interval [{100 * comparison['ci95'][0]:+.1f}, {100 * comparison['ci95'][1]:+.1f}].",
        ]
    lines += ["", *by_train_count(test_results, labels)]
    path.write_text("\n".join(lines) + "\n")


@app.command()
def report(
    record_path: Path = typer.Argument(REPO / "out" / "nicopp-mini-bench" / "nicopp_mini.json"),
    out: Path = typer.Option(REPO / "out" / "nicopp-mini-bench" / "nicopp_mini.md"),
) -> None:
    """The tables again from a finished run's nicopp_mini.json (no training, no generation)."""
    record = json.loads(record_path.read_text())

    def tables(part: str) -> dict[str, dict[tuple[int, int], dict]]:
        return {
            name: {tuple(int(i) for i in key.split(",")): r for key, r in table.items()}
            for name, table in record[part].items()
        }

    chosen = [v for v in VARIANTS if v.name in record["variants"]]
    write_report(record, tables("validation"), tables("test"), chosen, out)
    print(out.read_text())


if __name__ == "__main__":
    app()
