"""The committed `fgs-digits-contexts` pipeline: the worker loads it by name through the SD 2.1 unCLIP code path,
its card names classes, contexts and the prompt form, and a prompt's context shows in the sample's colours."""

from __future__ import annotations

import json

import pytest

from fgs_client.digits_contexts import CONTEXTS
from fgs_client.digits_lt import CLASS_NAMES
from fgs_common.wire import GenerationParams
from fgs_lab.contexts_model_training import build_context_bank
from fgs_lab.nicopp_mini import class_and_context, context_evaluator
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import EMBEDDED_MODELS_DIR, load_pipeline, read_model_card, resolve_model_dir

MODEL = "fgs-digits-contexts"
pytestmark = pytest.mark.model  # the diffusion model in process: not in --fast
# The weights are committed (worker/fgs_worker/models/fgs-digits-contexts); a checkout without them skips.
shipped = pytest.mark.skipif(
    not (EMBEDDED_MODELS_DIR / MODEL / "model_index.json").is_file(), reason=f"{MODEL} is not trained yet"
)


@pytest.fixture(scope="module")
def sampler() -> GuidedDDIMSampler:
    return GuidedDDIMSampler(load_pipeline(MODEL, device="cpu"))


@shipped
def test_card_and_size() -> None:
    directory = resolve_model_dir(MODEL)
    assert directory == EMBEDDED_MODELS_DIR / MODEL
    card = read_model_card(MODEL)
    assert card["class_names"] == list(CLASS_NAMES) and card["contexts"] == list(CONTEXTS)
    assert card["prompt_template"] == "{class_name} in {group}" and card["card"].endswith("README.md")
    assert sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) <= 20_000_000
    record = json.loads((directory / "training.json").read_text())
    assert record["generator_digits"] >= 420 and record["context_bank_images"] == record["generator_digits"] * 12


@shipped
def test_the_context_of_a_text_only_prompt_shows_in_its_samples(sampler: GuidedDDIMSampler) -> None:
    """Text-only samples of "<digit> in <context>", judged by the bench's class x context classifier trained on
    real drawings only (`fgs_lab.nicopp_mini.context_evaluator`). A sample's mean colour is no judge: the model's
    samples are darker than the renderer's drawings, and outdoor and water differ in layout (a sky gradient,
    ripples), not in mean colour. The first, colourless training fails it (4 of 12 contexts, 12 of 12 classes)."""
    prompts = [f"{CLASS_NAMES[k % 10]} in {context}" for k, context in enumerate(CONTEXTS * 2)]
    output = sampler(
        prompt=prompts,
        class_index=[k % 10 for k in range(len(prompts))],
        seeds=list(range(len(prompts))),
        params=GenerationParams(steps=10, gamma=3.0),
    )
    classes, contexts = class_and_context(context_evaluator(), output.pixels)
    context_hits = sum(CONTEXTS[c] == context for c, context in zip(contexts, CONTEXTS * 2, strict=True))
    class_hits = sum(int(c) == k % 10 for k, c in enumerate(classes))
    assert context_hits >= 10, f"{context_hits} of 12 samples in their prompt's context"
    assert class_hits >= 9, f"{class_hits} of 12 samples of their prompt's class"


def test_the_bank_holds_only_generator_digits_in_every_context() -> None:
    from fgs_client.digits_contexts import generator_indices
    from fgs_lab.contexts_model_training import ContextsPlan

    bank = build_context_bank(ContextsPlan(draws_per_context=1))
    assert set(bank.sources.tolist()) == set(generator_indices())
    assert len(bank.labels) == 6 * len(generator_indices()) and set(bank.labels.tolist()) == set(range(60))
