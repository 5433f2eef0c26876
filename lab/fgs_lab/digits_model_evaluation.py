"""Checks of the `fgs-digits` pipeline: sampling through the stock diffusers pipeline and small digit classifiers.

Used by `bench/measure_fgs_digits.py` (the acceptance numbers in worker/fgs_worker/models/fgs-digits/README.md),
`bench/digits_samples.py` (a grid to look at) and tests/test_digits_model.py. The classifiers are scikit-learn
MLPs on 16x16 RGB thumbnails: one trained on the generator's own (styled) training images, one on original-style
generator-split digits. Neither ever sees a Digits-LT test digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableUnCLIPImg2ImgPipeline
from PIL import Image

from fgs_client.digits_lt import CLASS_NAMES, class_prompt
from fgs_lab.digits_model_training import StyleProbabilities, build_style_bank, original_style_digits


def thumbnails(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, 3, 32, 32] images in [0, 1] (tensor, or [N, 32, 32, 3] numpy as the pipeline returns)
    -> [N, 768] features."""
    tensor = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if tensor.shape[-1] == 3:
        tensor = tensor.permute(0, 3, 1, 2)
    return F.avg_pool2d(tensor, 2).flatten(1).numpy()


@dataclass
class DigitClassifier:
    """An MLP over `thumbnails`; `features` is its hidden layer (the space diversity is measured in)."""

    model: object  # sklearn.neural_network.MLPClassifier

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.model.predict(thumbnails(images))

    def features(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = thumbnails(images)
        return np.maximum(0.0, x @ self.model.coefs_[0] + self.model.intercepts_[0])


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, max_iter: int = 60) -> DigitClassifier:
    """Fit a one-hidden-layer MLP on [N, 3, 32, 32] images in [0, 1]."""
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(128,), max_iter=max_iter, random_state=seed, alpha=1e-3)
    model.fit(thumbnails(images), labels.numpy())
    return DigitClassifier(model)


def generator_style_classifier(styles_per_digit: int = 4, seed: int = 0) -> DigitClassifier:
    """A classifier trained on the generator's own kind of training images (styled generator-split digits)."""
    bank = build_style_bank(styles_per_digit, seed, StyleProbabilities())
    return fit_classifier(bank.images, bank.labels, seed)


def original_style_classifier(generator: tuple[int, ...], seed: int = 0) -> DigitClassifier:
    """A classifier trained on generator-split digits in Digits-LT's original style (dark ink on white)."""
    images, labels = original_style_digits(generator)
    return fit_classifier(images, labels, seed, max_iter=200)


@torch.no_grad()
def embed_conditioning(pipeline: StableUnCLIPImg2ImgPipeline, images: list[Image.Image]) -> torch.Tensor:
    """CLIP image embeddings [N, d] exactly as the pipeline computes them from PIL images."""
    pixels = pipeline.feature_extractor(images=images, return_tensors="pt").pixel_values
    return pipeline.image_encoder(pixels).image_embeds


@torch.no_grad()
def sample_digits(
    pipeline: StableUnCLIPImg2ImgPipeline,
    class_index: int,
    seeds: list[int],
    conditioning: Image.Image | list[Image.Image] | None = None,
    dropout_p: float = 0.0,
    steps: int = 20,
    guidance_scale: float = 3.0,
) -> np.ndarray:
    """[B, 32, 32, 3] samples in [0, 1] from the stock pipeline, one per seed: text only (`conditioning` None:
    a zero image embedding) or text + image (one image for all seeds, or one per seed), the embedding dropped
    out element-wise with `dropout_p`."""
    if conditioning is None:
        embeds = torch.zeros(len(seeds), pipeline.image_encoder.config.projection_dim)
    else:
        if isinstance(conditioning, Image.Image):
            embeds = embed_conditioning(pipeline, [conditioning]).repeat(len(seeds), 1)
        else:
            embeds = embed_conditioning(pipeline, list(conditioning))
        if dropout_p > 0:
            generator = torch.Generator().manual_seed(seeds[0])
            keep = (torch.rand(embeds.shape, generator=generator) >= dropout_p).float()
            embeds = embeds * keep / (1 - dropout_p)
    latents = torch.cat(
        [
            torch.randn(
                (
                    1,
                    pipeline.unet.config.in_channels,
                    pipeline.unet.config.sample_size,
                    pipeline.unet.config.sample_size,
                ),
                generator=torch.Generator().manual_seed(seed),
            )
            for seed in seeds
        ]
    )
    return pipeline(
        prompt=[class_prompt(CLASS_NAMES[class_index])] * len(seeds),
        image_embeds=embeds,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seeds[0]),
        output_type="np",
    ).images


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows."""
    diffs = features[:, None, :] - features[None, :, :]
    distances = np.sqrt((diffs**2).sum(-1))
    n = len(features)
    return float(distances.sum() / (n * (n - 1)))
