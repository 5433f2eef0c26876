"""The NICO++ miniature experiment's pieces: splits with their groups, synthetic sets from the balance plan,
worst-group accuracy, and the digit + context evaluator of the `fgs-digits-contexts` generator.

Synthetic sets are planned exactly as `fgs-client balance --dataset nico++` plans them (`plan_balance`,
`build_jobs`: the same targets, "other groups" conditioning for empty groups, prompts "class in context", seeded
picks) and sampled by the worker's own sampler (`GuidedDDIMSampler`) in process, in large batches: the service
adds queues, not pixels, and this machine has no time to spare (tests/test_nicopp_mini_e2e.py runs the same plan
through the service). Used by bench/nicopp_mini.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fgs_classifier.registry import LoadedClassifier
from fgs_client.balance_planner import ConditioningSource, UnitCounts, build_jobs, plan_balance
from fgs_client.dataset_readers import ScannedDataset, read_dataset
from fgs_client.digits_contexts import CONTEXTS, read_held_out
from fgs_client.training import GroupAccuracy, group_accuracy
from fgs_lab.contexts_model_training import ContextsPlan, build_context_bank, prompt_index
from fgs_lab.digits_classifier import ImageSet, load_paths, predict
from fgs_lab.digits_model_evaluation import DigitClassifier, fit_classifier
from fgs_lab.variants import Variant
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler


def group_id(class_index: int, context: str) -> int:
    """SubpopBench's group id a + 6 y (y the class, a the context index; /work/shared/datasets/README.md)."""
    return prompt_index(class_index, context)


@dataclass
class GroupedSet:
    """An ImageSet and the group id of each image."""

    images: ImageSet
    groups: torch.Tensor

    def __add__(self, other: GroupedSet) -> GroupedSet:
        return GroupedSet(self.images + other.images, torch.cat([self.groups, other.groups]))


def read_train(root: Path) -> tuple[ScannedDataset, GroupedSet]:
    """The miniature's train split through the nico++ reader (what `fgs-client balance` reads)."""
    dataset = read_dataset("nico++", root)
    images = load_paths([im.path for im in dataset.images], [im.class_index for im in dataset.images], False)
    groups = torch.tensor([group_id(im.class_index, im.group) for im in dataset.images])
    return dataset, GroupedSet(images, groups)


def read_part(root: Path, part: str) -> GroupedSet:
    """validation or test, every group."""
    found = read_held_out(root, part)
    images = load_paths([p for p, _, _ in found], [c for _, c, _ in found], False)
    return GroupedSet(images, torch.tensor([group_id(c, g) for _, c, g in found]))


def accuracy_by_group(model, held_out: GroupedSet) -> GroupAccuracy:
    """Worst-group and average accuracy (paper Table 1's columns; groups are equal-sized, so they agree with
    SubpopBench's mean over groups)."""
    return group_accuracy(predict(model, held_out.images.images), held_out.images.labels, held_out.groups)


def synthetic_set(
    sampler: GuidedDDIMSampler,
    dataset: ScannedDataset,
    target,
    variant: Variant,
    seed: int,
    steps: int,
    guidance_every: int,
    classifier: LoadedClassifier | None = None,
    batch: int = 64,
) -> tuple[GroupedSet, list[Image.Image]]:
    """The images `fgs-client balance --target TARGET --seed SEED` would add, sampled in process."""
    plan = plan_balance(UnitCounts.from_dataset(dataset), target, images_per_job=batch)
    items = []  # (prompt, class, conditioning path or None, seed, group)
    for job in build_jobs(plan, dataset, seed=seed):
        for k in range(job.num_images):
            text_only = variant.text_only or job.entry.conditioning is ConditioningSource.text
            picked = None if text_only else job.conditioning[k].path
            items.append((job.prompt, job.entry.class_index, picked, job.seed + k, job.entry.group))
    params = variant.params(steps, guidance_every)
    pictures: list[Image.Image] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        conditioning = [Image.open(p).convert("RGB") if p is not None else None for _, _, p, _, _ in chunk]
        output = sampler(
            prompt=[p for p, *_ in chunk],
            class_index=[c for _, c, *_ in chunk],
            conditioning_images=conditioning if any(c is not None for c in conditioning) else (),
            seeds=[s for *_, s, _ in chunk],
            params=params,
            classifier=classifier if variant.guided else None,
        )
        pictures.extend(output.images)
    labels = [c for _, c, *_ in items]
    tensor = torch.stack([torch.from_numpy(np.asarray(p, np.float32) / 255).permute(2, 0, 1) for p in pictures])
    images = ImageSet(tensor, torch.tensor(labels), torch.ones(len(labels), dtype=torch.bool))
    groups = torch.tensor([group_id(c, g) for _, c, _, _, g in items])
    return GroupedSet(images, groups), pictures


# ---------------------------------------------------------------- the generator's digit + context evaluator


def context_evaluator(seed: int = 1) -> DigitClassifier:
    """A 60-way (class x context) MLP on real drawings only: the generator-split digits drawn afresh in every
    context (another drawing seed than the generator's bank; no sample of any model)."""
    bank = build_context_bank(ContextsPlan(seed=1000 + seed, draws_per_context=1))
    return fit_classifier(bank.images, bank.labels, seed, max_iter=60)


def class_and_context(evaluator: DigitClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class index and context index of [N, 3, 32, 32] images."""
    predicted = evaluator.predict(images)
    return predicted // len(CONTEXTS), predicted % len(CONTEXTS)
