"""Train `fgs-digits-contexts`: the embedded StableUnCLIP-format pipeline that knows NICO++'s six contexts.

The same architecture (`DIGITS_CONFIG`), stages and schedules as `fgs-digits` (`fgs_lab.digits_model_training`:
CLIP towers, VAE, UNet with the unCLIP image-embedding conditioning), trained on another world: every
generator-split digit of the Digits-Contexts miniature (`fgs_client.digits_contexts.generator_indices`, never a
train, validation or test digit) drawn `draws_per_context` times in each of the six contexts by the miniature's
own renderer (`draw_in_context`), with the prompt "<class> in <context>" (the nico++ reader's form). Text alone
then says which digit and where; the image embedding carries one drawing's shape and background.

Seeded and deterministic on CPU for a given thread count; `examples/train_fgs_digits_contexts.py` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fgs_client.digits_contexts import CONTEXTS, PROMPT_TEMPLATE, SPLIT_SEED, contexts_split, draw_in_context
from fgs_client.digits_lt import CLASS_NAMES, load_digit_arrays, upscaled_ink
from fgs_lab.digits_model_training import (
    Progress,
    StyleBank,
    TrainingPlan,
    TrainingResult,
    train_stages,
)


def context_prompts() -> list[str]:
    """The 60 prompts, index class * 6 + context: "zero in autumn", "zero in dim", ..."""
    return [PROMPT_TEMPLATE.format(class_name=name, group=context) for name in CLASS_NAMES for context in CONTEXTS]


def prompt_index(class_index: int, context: str) -> int:
    return class_index * len(CONTEXTS) + CONTEXTS.index(context)


@dataclass(frozen=True)
class ContextsPlan:
    """Everything that decides the weights: the drawing of the bank, and fgs-digits' stage plan (same defaults)."""

    seed: int = 0
    split_seed: int = SPLIT_SEED
    draws_per_context: int = 2  # 6 contexts x 2 = 12 drawings per digit (fgs-digits: 8 styles per digit)
    stages: TrainingPlan = field(default_factory=TrainingPlan)


def build_context_bank(plan: ContextsPlan) -> StyleBank:
    """Every generator digit drawn `draws_per_context` times in every context; labels are prompt indices."""
    digits, labels = load_digit_arrays()
    generator = contexts_split(labels, plan.split_seed).generator
    rng = np.random.default_rng(plan.seed)
    images, prompt_labels, sources = [], [], []
    for index in generator:
        ink = upscaled_ink(digits[index])
        for context in CONTEXTS:
            for _ in range(plan.draws_per_context):
                images.append(draw_in_context(ink, context, rng))
                prompt_labels.append(prompt_index(int(labels[index]), context))
                sources.append(index)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float()
    return StyleBank(stacked, torch.tensor(prompt_labels), torch.tensor(sources))


def train_fgs_digits_contexts(
    workdir: Path, plan: ContextsPlan = ContextsPlan(), progress: Progress = Progress()
) -> TrainingResult:
    """Build the `DIGITS_CONFIG` pipeline and train it with fgs-digits' stages on the context bank."""
    return train_stages(
        workdir, plan.stages, lambda: build_context_bank(plan), progress, context_prompts(), bank_name="context bank"
    )
