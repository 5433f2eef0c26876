"""The retraining recipe is ONE definition (fgs_client.training.RETRAIN_RECIPE): every tool that retrains on real +
synthetic takes it, none builds its own batches or loss, and it is the recipe bench/digits_lt.py chose on
validation (issue 21). The recipe's batches and priors are checked on numbers."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

from fgs_client.training import RETRAIN_RECIPE, RETRAIN_RECIPES, RetrainRecipe, retrain_recipe

REPO = Path(__file__).resolve().parents[1]
# The places that retrain a classifier on real + synthetic images (the list and the shared loop).
RETRAINERS = ("examples/demo.py", "examples/retrain_on_balanced.py", "lab/fgs_lab/digits_classifier.py")
# Benches that compare the candidates on purpose: they may name a recipe other than RETRAIN_RECIPE.
COMPARERS = ("bench/digits_lt.py", "bench/retrain_prior.py")
# What only fgs_client.training (the recipe) may call: a second sampler or loss call would be a second recipe.
RECIPE_PARTS = {"RealSyntheticBatchSampler", "balanced_softmax_loss"}


def python_files() -> list[Path]:
    roots = ("bench", "examples", "lab", "client", "service", "worker", "common", "classifier", "scripts")
    return [p for root in roots for p in (REPO / root).rglob("*.py") if ".venv" not in p.parts]


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def called_name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def test_no_module_but_the_recipe_builds_training_batches_or_a_training_loss():
    offenders = []
    for path in python_files():
        relative = path.relative_to(REPO).as_posix()
        if relative == "client/fgs_client/training.py" or relative.startswith("worker/"):
            continue  # the worker's loss criterion (Eq. 2) scores images; it trains nothing
        # the retrainers use no loss of their own either (bench/toy2d.py and the generator's training are no
        # retraining on synthetic images and keep their cross-entropy)
        forbidden = RECIPE_PARTS | ({"cross_entropy"} if relative in RETRAINERS + COMPARERS else set())
        for call in calls(ast.parse(path.read_text())):
            if called_name(call) in forbidden:
                offenders.append(f"{relative}:{call.lineno} calls {called_name(call)}")
    assert not offenders, "training outside RETRAIN_RECIPE: " + "; ".join(offenders)


def test_every_retrainer_takes_the_one_recipe():
    from fgs_lab import digits_classifier

    # the shared loop defaults to the one recipe, so a caller that names none trains with it
    assert inspect.signature(digits_classifier.train_small_cnn).parameters["recipe"].default is RETRAIN_RECIPE
    for relative in RETRAINERS:
        tree = ast.parse((REPO / relative).read_text())
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert "RETRAIN_RECIPE" in names or relative == "lab/fgs_lab/digits_classifier.py", relative
        for call in calls(tree):
            if called_name(call) == "train_small_cnn":
                named = [k.value for k in call.keywords if k.arg == "recipe"] + call.args[3:]
                assert all(isinstance(a, ast.Name) and a.id == "RETRAIN_RECIPE" for a in named), (
                    f"{relative}:{call.lineno} retrains with another recipe"
                )
        for call in calls(tree):
            if called_name(call) in ("plan", "loss") and isinstance(call.func, ast.Attribute):
                owner = call.func.value
                # the shared loop calls its `recipe` parameter, whose default is checked above
                allowed = "recipe" if relative == "lab/fgs_lab/digits_classifier.py" else "RETRAIN_RECIPE"
                assert isinstance(owner, ast.Name) and owner.id == allowed, f"{relative}:{call.lineno}"
    # only the comparing benches pass a recipe of their own to the shared loop
    for path in python_files():
        relative = path.relative_to(REPO).as_posix()
        if relative in COMPARERS:
            continue
        for call in calls(ast.parse(path.read_text())):
            if called_name(call) == "train_small_cnn":
                assert not [k for k in call.keywords if k.arg == "recipe"] and len(call.args) < 4, (
                    f"{relative}:{call.lineno} passes its own recipe"
                )


def test_the_recipe_is_the_one_digits_lt_chose_on_validation():
    summary = json.loads((REPO / "bench" / "digits_lt.json").read_text())
    choice = summary.get("recipe_selection")
    assert choice, "bench/digits_lt.json records no recipe selection"
    assert choice["recipe"] == RETRAIN_RECIPE.name
    assert set(choice["candidates"]) == {r.name for r in RETRAIN_RECIPES}


def test_recipe_batches_and_priors():
    labels = [0] * 30 + [1] * 10 + [2] * 2 + [0, 1, 2] * 6  # 42 real, 18 synthetic (the last 18)
    synthetic = [False] * 42 + [True] * 18
    real_counts = torch.tensor([30, 10, 2])
    by_name = {r.name: r for r in RETRAIN_RECIPES}

    batches, prior = by_name["real_counts_50"].plan(labels, synthetic, 8, 50, seed=0)
    batches = list(batches)
    assert len(batches) == 50 and all(sum(synthetic[i] for i in b) == 4 for b in batches)
    assert torch.equal(prior, real_counts)

    batches, prior = by_name["batches_25"].plan(labels, synthetic, 8, 400, seed=0)
    batches = list(batches)
    assert all(sum(synthetic[i] for i in b) == 2 for b in batches)  # 25 % of 8
    drawn = torch.bincount(torch.tensor([labels[i] for b in batches for i in b]), minlength=3).double()
    assert torch.allclose(prior, torch.full((3,), 1 / 3, dtype=prior.dtype))  # class-balanced batches: uniform
    assert torch.allclose(drawn / drawn.sum(), prior, atol=0.03)  # ... and that is what they draw

    batches, prior = by_name["cross_entropy_set"].plan(labels, synthetic, 8, 10, seed=0)
    assert prior is None and len(list(batches)) == 10
    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    assert torch.isclose(RetrainRecipe.loss(logits, target, None), torch.nn.functional.cross_entropy(logits, target))

    # without synthetic images every recipe trains the same baseline: instance sampling, the real counts
    for recipe in RETRAIN_RECIPES:
        batches, prior = recipe.plan(labels[:42], synthetic[:42], 8, 5, seed=1)
        assert torch.equal(prior, real_counts) and max(i for b in batches for i in b) < 42

    with pytest.raises(ValueError, match="no retraining recipe 'nope'"):
        retrain_recipe("nope")
