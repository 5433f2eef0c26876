"""The committed `fgs-digits` pipeline: loads as SD 2.1 unCLIP does, stays small, and its samples are digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import StableUnCLIPImg2ImgPipeline

from fgs_client.digits_lt import digits_split, generator_indices, load_digit_arrays, original_style_image
from fgs_lab.digits_model_evaluation import generator_style_classifier, mean_pairwise_distance, sample_digits
from fgs_lab.digits_model_training import StyleProbabilities, build_style_bank

pytestmark = pytest.mark.model  # the diffusion model in process: minutes of CPU, so not in --fast
MODEL_DIR = Path(__file__).resolve().parents[1] / "worker" / "fgs_worker" / "models" / "fgs-digits"


@pytest.fixture(scope="module")
def pipeline() -> StableUnCLIPImg2ImgPipeline:
    loaded = StableUnCLIPImg2ImgPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_model_is_small_safetensors_in_unclip_layout(pipeline: StableUnCLIPImg2ImgPipeline) -> None:
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20_000_000
    weights = [p.relative_to(MODEL_DIR).parts[0] for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert sorted(weights) == ["image_encoder", "image_normalizer", "text_encoder", "unet", "vae"]
    assert all(p.suffix != ".bin" for p in files)
    assert pipeline.unet.config.class_embed_type == "projection"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    # The normalizer holds real embedding statistics, not the 0/1 defaults.
    assert float(pipeline.image_normalizer.std.mean()) != pytest.approx(1.0)


def test_style_bank_uses_only_generator_digits() -> None:
    bank = build_style_bank(1, seed=0, styles=StyleProbabilities())
    assert set(bank.sources.tolist()) == set(generator_indices())
    # The generator's world is broader than Digits-LT's: many of its digits are light ink on dark paper.
    dark_paper = bank.images[:, :, :2, :].mean((1, 2, 3)) < 0.5
    assert 0.4 < float(dark_paper.float().mean()) < 0.8


def test_text_only_samples_are_recognised(pipeline: StableUnCLIPImg2ImgPipeline) -> None:
    classifier = generator_style_classifier(styles_per_digit=2)
    classes = [0, 4, 7]
    hits = 0
    for c in classes:
        samples = sample_digits(pipeline, c, seeds=[11, 12, 13, 14], steps=10)
        assert samples.shape == (4, 32, 32, 3)
        hits += int(np.sum(classifier.predict(samples) == c))
    assert hits >= 10, f"{hits} of 12 text-only samples recognised"


def test_image_conditioning_at_dropout_zero_gives_near_copies(pipeline: StableUnCLIPImg2ImgPipeline) -> None:
    digits, labels = load_digit_arrays()
    seven = original_style_image(digits[next(i for i in digits_split(labels).train if labels[i] == 7)])
    seeds = [21, 22, 23, 24]
    copies = sample_digits(pipeline, 7, seeds, seven, 0.0, steps=10)
    free = sample_digits(pipeline, 7, seeds, steps=10)
    flat = lambda images: images.reshape(len(images), -1)  # noqa: E731
    assert mean_pairwise_distance(flat(copies)) < 0.9 * mean_pairwise_distance(flat(free))
    # Light paper like the conditioning digit (the stylistic fix of image conditioning).
    assert float(copies[:, :2].mean()) > 0.6
