"""Train `fgs-digits`: the embedded StableUnCLIP-format pipeline, on the generator split of scikit-learn's digits.

The architecture is exactly `fgs_worker.tiny_model.build_tiny_pipeline` at `DIGITS_CONFIG` sizes, so the result
loads through the code that loads SD 2.1 unCLIP (`StableUnCLIPImg2ImgPipeline.from_pretrained`). Stages:

1. Style bank. Every generator digit (`fgs_client.digits_lt.generator_indices`, never a Digits-LT digit) is drawn
   `styles_per_digit` times under random style transforms (rotation, stroke width, blur, inversion, coloured ink).
   The generator's world is thus broader than Digits-LT's dark-ink-on-white, so text-only samples show the
   stylistic bias of the paper's section 2.2 and image conditioning has a style to transfer.
2. CLIP towers: the vision tower learns a contrastive image/prompt objective against the text tower (class) and,
   through a throw-away linear head, to reconstruct an 8x8 thumbnail of its input (style and shape), so an image
   embedding pins down one image and sampling at dropout p = 0 gives near copies (paper Figure 9).
3. VAE: 32x32x3 <-> 8x8x4 latents; `scaling_factor` set so scaled latents have unit standard deviation.
4. UNet: the DDIM scheduler's noise schedule and v-prediction target, text by cross-attention, the image
   embedding noise-augmented exactly as `StableUnCLIPImg2ImgPipeline.noise_image_embeddings` does (per-sample
   noise levels). The image embedding is, per sample, kept, dropped out element-wise with a random p (as the
   sampler's `dropout_p` does), zeroed before noise augmentation (a text-only call of the stock pipeline), or the
   whole class vector zeroed (the unconditional branch of classifier-free guidance); the prompt becomes "" at
   random for classifier-free guidance. The UNet's weights are an exponential moving average.

Seeded and deterministic on CPU for a given thread count; `examples/train_fgs_digits.py` runs it with a progress bar.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableUnCLIPImg2ImgPipeline
from diffusers.models.embeddings import get_timestep_embedding
from PIL import Image, ImageFilter

from fgs_client.digits_lt import (
    CLASS_NAMES,
    SPLIT_SEED,
    class_prompt,
    digits_split,
    load_digit_arrays,
    upscaled_ink,
)
from fgs_worker.tiny_model import TinyConfig, build_tiny_pipeline

DIGITS_CONFIG = TinyConfig(embed_dim=64, unet_channels=(64, 128), vae_channels=(16, 32, 32))


@dataclass(frozen=True)
class StyleProbabilities:
    """How often each style transform is drawn; with none of them a digit is in Digits-LT's original style."""

    rotate: float = 0.5  # uniform angle in +-max_rotation degrees
    max_rotation: float = 30.0
    bold: float = 0.25  # dilate the strokes
    thin: float = 0.2  # erode the strokes
    blur: float = 0.25
    invert: float = 0.6  # light ink on dark paper: the generator's dominant style, absent from Digits-LT
    colour: float = 0.3  # coloured ink instead of grey


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that decides the trained weights (with the seed); defaults are the committed model's."""

    seed: int = 0
    split_seed: int = SPLIT_SEED
    styles_per_digit: int = 8
    styles: StyleProbabilities = field(default_factory=StyleProbabilities)
    tower_steps: int = 600
    tower_batch: int = 128
    tower_lr: float = 2e-3
    vae_steps: int = 300
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1400
    unet_batch: int = 64
    unet_lr: float = 1.5e-3
    unet_ema_decay: float = 0.995
    text_drop: float = 0.1  # prompt -> "" (classifier-free guidance)
    image_zero_raw: float = (
        0.08  # raw image embedding -> 0 before noise augmentation (text-only via the stock pipeline)
    )
    image_zero_all: float = 0.08  # the whole class vector -> 0 (the pipeline's unconditional branch)
    image_dropout: float = 0.3  # element-wise dropout with p ~ U(0, 1) (the sampler's dropout_p)
    noise_augment: float = 0.5  # share of samples with a random image-embedding noise level (else level 0)


# ---------------------------------------------------------------------------------------------------------------
# 1. Styles


def stylize(ink: np.ndarray, rng: np.random.Generator, styles: StyleProbabilities) -> np.ndarray:
    """A 32x32 ink map (0 paper .. 1 ink) under random style transforms: an RGB image [32, 32, 3] in [0, 1]."""
    image = Image.fromarray(np.round(255.0 * np.clip(ink, 0.0, 1.0)).astype(np.uint8), mode="L")
    if rng.random() < styles.rotate:
        image = image.rotate(float(rng.uniform(-styles.max_rotation, styles.max_rotation)), resample=Image.BILINEAR)
    stroke = rng.random()
    if stroke < styles.bold:
        image = image.filter(ImageFilter.MaxFilter(3))
    elif stroke < styles.bold + styles.thin:
        image = image.filter(ImageFilter.MinFilter(3))
    if rng.random() < styles.blur:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.5))))
    styled = np.asarray(image, dtype=np.float32) / 255.0
    if styled.max() > 0:
        styled = styled / styled.max()
    ink_colour = np.zeros(3, np.float32)
    paper = np.ones(3, np.float32)
    if rng.random() < styles.colour:
        ink_colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        ink_colour[rng.integers(3)] = 0.0  # saturated: at least one channel off
    if rng.random() < styles.invert:
        paper = np.zeros(3, np.float32)
        ink_colour = 1.0 - ink_colour
    return paper * (1.0 - styled[..., None]) + ink_colour * styled[..., None]


def original_style_array(ink: np.ndarray) -> np.ndarray:
    """A 32x32 ink map in Digits-LT's original style (dark ink on white) as [32, 32, 3] in [0, 1]."""
    return np.repeat((1.0 - ink)[..., None], 3, axis=2).astype(np.float32)


@dataclass
class StyleBank:
    """Styled generator digits: images [N, 3, 32, 32] in [0, 1], labels [N], source load_digits indices [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor


def build_style_bank(per_digit: int, seed: int, styles: StyleProbabilities, split_seed: int = SPLIT_SEED) -> StyleBank:
    """`per_digit` styled copies of every generator-split digit (Digits-LT digits are never touched)."""
    digits, labels = load_digit_arrays()
    generator = digits_split(labels, split_seed).generator
    rng = np.random.default_rng(seed)
    images, bank_labels, sources = [], [], []
    for index in generator:
        ink = upscaled_ink(digits[index])
        for _ in range(per_digit):
            images.append(stylize(ink, rng, styles))
            bank_labels.append(labels[index])
            sources.append(index)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return StyleBank(stacked, torch.tensor(bank_labels), torch.tensor(sources))


def original_style_digits(indices: tuple[int, ...] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """load_digits digits at `indices` in original style: images [N, 3, 32, 32] in [0, 1], labels [N]."""
    digits, labels = load_digit_arrays()
    images = np.stack([original_style_array(upscaled_ink(digits[i])) for i in indices])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[list(indices)])


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


class Progress:
    """Receives (stage, done, total, loss) from the trainer; the script shows it as a progress bar."""

    def __call__(self, stage: str, done: int, total: int, loss: float | None) -> None:  # pragma: no cover - overridden
        pass


def clip_pixels(pipeline: StableUnCLIPImg2ImgPipeline, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, 32, 32] images in [0, 1] normalised as the pipeline's feature extractor does (CLIP mean and std)."""
    mean = torch.tensor(pipeline.feature_extractor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(pipeline.feature_extractor.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


def prompt_states(pipeline: StableUnCLIPImg2ImgPipeline, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states [len(prompts), max_length, d], as the pipeline encodes prompts."""
    tokens = pipeline.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipeline.text_encoder(tokens.input_ids).last_hidden_state


def noise_image_embeddings(
    pipeline: StableUnCLIPImg2ImgPipeline, image_embeds: torch.Tensor, noise_levels: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample-level copy of diffusers' `StableUnCLIPImg2ImgPipeline.noise_image_embeddings` (0.42.1):
    normalise, add DDPM noise at `noise_levels`, unnormalise, append the levels' sinusoidal embedding."""
    scaled = pipeline.image_normalizer.scale(image_embeds)
    noised = pipeline.image_noising_scheduler.add_noise(scaled, timesteps=noise_levels, noise=noise)
    unscaled = pipeline.image_normalizer.unscale(noised)
    level_embedding = get_timestep_embedding(
        timesteps=noise_levels, embedding_dim=image_embeds.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0
    )
    return torch.cat((unscaled, level_embedding.to(unscaled.dtype)), 1)


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int = 50) -> None:
    """Linear warm-up then cosine decay to 5% of `base_lr`."""
    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        lr = base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for group in optimizer.param_groups:
        group["lr"] = lr


@contextmanager
def training(*modules: torch.nn.Module) -> Iterator[None]:
    """Modules in train mode inside, eval mode after."""
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module in modules:
            module.eval()


# ---------------------------------------------------------------------------------------------------------------
# 2. CLIP towers


def digit_prompts() -> list[str]:
    """fgs-digits' prompts, one per class: a style bank's label indexes them."""
    return [class_prompt(name) for name in CLASS_NAMES]


def train_towers(
    pipeline: StableUnCLIPImg2ImgPipeline,
    bank: StyleBank,
    plan: TrainingPlan,
    progress: Progress,
    prompts: list[str] | None = None,
) -> None:
    """Contrastive image/prompt training of both towers plus a thumbnail-reconstruction head on the image embedding.
    `bank.labels` index `prompts` (default: the ten digit prompts)."""
    generator = torch.Generator().manual_seed(plan.seed + 1)
    d = pipeline.image_encoder.config.projection_dim
    thumbnail_head = torch.nn.Linear(d, 3 * 8 * 8)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    tokens = pipeline.tokenizer(
        prompts or digit_prompts(),
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    parameters = [
        *pipeline.image_encoder.parameters(),
        *pipeline.text_encoder.parameters(),
        *thumbnail_head.parameters(),
        logit_scale,
    ]
    optimizer = torch.optim.AdamW(parameters, lr=plan.tower_lr, weight_decay=0.01)
    thumbnails = F.avg_pool2d(bank.images, 4).flatten(1)
    pixels = clip_pixels(pipeline, bank.images)
    with training(pipeline.image_encoder, pipeline.text_encoder):
        for step in range(plan.tower_steps):
            cosine_lr(optimizer, plan.tower_lr, step, plan.tower_steps)
            batch = torch.randint(0, len(bank.labels), (plan.tower_batch,), generator=generator)
            image_embeds = pipeline.image_encoder(pixel_values=pixels[batch]).image_embeds
            text_embeds = pipeline.text_encoder(tokens).pooler_output
            logits = (
                logit_scale.exp().clamp(max=100)
                * F.normalize(image_embeds, dim=-1)
                @ F.normalize(text_embeds, dim=-1).T
            )
            labels = bank.labels[batch]
            # CLIP's symmetric loss with the prompts as the texts: image -> prompt, and prompt -> its images.
            image_to_text = F.cross_entropy(logits, labels)
            present = labels.unique()
            text_to_image = F.cross_entropy(
                logits.T[present],
                (labels[None, :] == present[:, None])
                .float()
                .div((labels[None, :] == present[:, None]).sum(1, keepdim=True)),
            )
            reconstruction = F.mse_loss(thumbnail_head(image_embeds), thumbnails[batch])
            loss = image_to_text + text_to_image + 20.0 * reconstruction
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress("CLIP towers", step + 1, plan.tower_steps, loss.item())


@torch.no_grad()
def embed_images(pipeline: StableUnCLIPImg2ImgPipeline, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Projected CLIP image embeddings [N, d] of [N, 3, 32, 32] images in [0, 1]."""
    pixels = clip_pixels(pipeline, images)
    return torch.cat([pipeline.image_encoder(pixel_values=chunk).image_embeds for chunk in pixels.split(batch)])


# ---------------------------------------------------------------------------------------------------------------
# 3. VAE


def train_vae(pipeline: StableUnCLIPImg2ImgPipeline, bank: StyleBank, plan: TrainingPlan, progress: Progress) -> None:
    """Reconstruction (L1 + MSE) with a small KL term; the scaling factor is set afterwards from the latents."""
    generator = torch.Generator().manual_seed(plan.seed + 2)
    vae = pipeline.vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    with training(vae):
        for step in range(plan.vae_steps):
            cosine_lr(optimizer, plan.vae_lr, step, plan.vae_steps)
            batch = bank.images[torch.randint(0, len(bank.labels), (plan.vae_batch,), generator=generator)] * 2 - 1
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(latents).sample
            loss = (
                F.l1_loss(reconstruction, batch)
                + F.mse_loss(reconstruction, batch)
                + plan.vae_kl_weight * posterior.kl().mean()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress("VAE", step + 1, plan.vae_steps, float(loss))


@torch.no_grad()
def encode_latents(
    pipeline: StableUnCLIPImg2ImgPipeline, images: torch.Tensor, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior means and standard deviations [N, 4, 8, 8] of [N, 3, 32, 32] images in [0, 1]."""
    means, stds = [], []
    for chunk in images.split(batch):
        posterior = pipeline.vae.encode(chunk * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------------------------
# 4. UNet


def condition_vectors(
    pipeline: StableUnCLIPImg2ImgPipeline, image_embeds: torch.Tensor, plan: TrainingPlan, generator: torch.Generator
) -> torch.Tensor:
    """The UNet's class labels for a batch: image embeddings dropped as at sampling time, then noise-augmented."""
    batch = image_embeds.shape[0]
    choice = torch.rand(batch, generator=generator)
    # Element-wise dropout with a per-sample p ~ U(0, 1), inverted-dropout scaling as torch.nn.functional.dropout.
    dropout_p = torch.rand(batch, 1, generator=generator)
    keep = (torch.rand(image_embeds.shape, generator=generator) >= dropout_p).float()
    dropped = image_embeds * keep / (1 - dropout_p).clamp(min=1e-3)
    use_dropout = (choice < plan.image_dropout)[:, None]
    embeds = torch.where(use_dropout, dropped, image_embeds)
    zero_raw = ((choice >= plan.image_dropout) & (choice < plan.image_dropout + plan.image_zero_raw))[:, None]
    embeds = torch.where(zero_raw, torch.zeros_like(embeds), embeds)
    levels = torch.randint(
        0, pipeline.image_noising_scheduler.config.num_train_timesteps, (batch,), generator=generator
    )
    levels = torch.where(torch.rand(batch, generator=generator) < plan.noise_augment, levels, torch.zeros_like(levels))
    noise = torch.randn(embeds.shape, generator=generator)
    vectors = noise_image_embeddings(pipeline, embeds, levels, noise)
    zero_all = (torch.rand(batch, generator=generator) < plan.image_zero_all)[:, None]
    return torch.where(zero_all, torch.zeros_like(vectors), vectors)


def train_unet(
    pipeline: StableUnCLIPImg2ImgPipeline,
    bank: StyleBank,
    image_embeds: torch.Tensor,
    plan: TrainingPlan,
    progress: Progress,
    prompts: list[str] | None = None,
) -> None:
    """Denoising training with the DDIM scheduler's schedule and prediction type; the UNet ends as its EMA.
    `bank.labels` index `prompts` (default: the ten digit prompts)."""
    generator = torch.Generator().manual_seed(plan.seed + 3)
    scheduler = pipeline.scheduler
    unet = pipeline.unet
    latent_mean, latent_std = encode_latents(pipeline, bank.images)
    scaling = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        prompts = prompts or digit_prompts()
        texts = prompt_states(pipeline, [*prompts, ""])
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=plan.unet_lr, weight_decay=0.01)
    num_timesteps = scheduler.config.num_train_timesteps
    with training(unet):
        for step in range(plan.unet_steps):
            cosine_lr(optimizer, plan.unet_lr, step, plan.unet_steps, warmup=100)
            batch = torch.randint(0, len(bank.labels), (plan.unet_batch,), generator=generator)
            latents = (
                latent_mean[batch] + latent_std[batch] * torch.randn(latent_mean[batch].shape, generator=generator)
            ) * scaling
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, num_timesteps, (plan.unet_batch,), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            if scheduler.config.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            text_index = torch.where(
                torch.rand(plan.unet_batch, generator=generator) < plan.text_drop,
                torch.full_like(bank.labels[batch], len(prompts)),
                bank.labels[batch],
            )
            with torch.no_grad():
                class_labels = condition_vectors(pipeline, image_embeds[batch], plan, generator)
            prediction = unet(
                noisy, timesteps, encoder_hidden_states=texts[text_index], class_labels=class_labels
            ).sample
            loss = F.mse_loss(prediction, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            decay = min(plan.unet_ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for averaged, current in zip(ema.parameters(), unet.parameters(), strict=False):
                    averaged.lerp_(current, 1 - decay)
            progress("UNet", step + 1, plan.unet_steps, float(loss))
    unet.load_state_dict(ema.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class TrainingResult:
    """The trained pipeline and what the README reports."""

    pipeline: StableUnCLIPImg2ImgPipeline
    seconds: dict[str, float]
    bank_size: int
    generator_digits: int


def train_fgs_digits(
    workdir: Path, plan: TrainingPlan = TrainingPlan(), progress: Progress = Progress()
) -> TrainingResult:
    """Build the `DIGITS_CONFIG` pipeline (tokenizer written under `workdir`) and train it stage by stage."""
    return train_stages(
        workdir,
        plan,
        lambda: build_style_bank(plan.styles_per_digit, plan.seed, plan.styles, plan.split_seed),
        progress,
        bank_name="style bank",
    )


def train_stages(
    workdir: Path,
    plan: TrainingPlan,
    build_bank: Callable[[], StyleBank],
    progress: Progress,
    prompts: list[str] | None = None,
    bank_name: str = "bank",
) -> TrainingResult:
    """The one stage sequence of every embedded model: bank, CLIP towers, VAE, UNet (`bank.labels` index
    `prompts`; default: the ten digit prompts). fgs-digits and fgs-digits-contexts differ only in bank and prompts."""
    torch.manual_seed(plan.seed)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    pipeline = build_tiny_pipeline(Path(workdir), DIGITS_CONFIG, seed=plan.seed)
    bank = build_bank()
    seconds[bank_name] = time.perf_counter() - start

    start = time.perf_counter()
    train_towers(pipeline, bank, plan, progress, prompts)
    image_embeds = embed_images(pipeline, bank.images)
    # The normalizer holds the embedding statistics so that unCLIP's noise augmentation acts on a unit-scale vector.
    with torch.no_grad():
        pipeline.image_normalizer.mean.copy_(image_embeds.mean(0, keepdim=True))
        pipeline.image_normalizer.std.copy_(image_embeds.std(0, keepdim=True))
    seconds["CLIP towers"] = time.perf_counter() - start

    start = time.perf_counter()
    train_vae(pipeline, bank, plan, progress)
    latent_mean, _ = encode_latents(pipeline, bank.images)
    pipeline.vae.register_to_config(scaling_factor=float(1.0 / latent_mean.std()))
    seconds["VAE"] = time.perf_counter() - start

    start = time.perf_counter()
    train_unet(pipeline, bank, image_embeds, plan, progress, prompts)
    seconds["UNet"] = time.perf_counter() - start
    for module in (
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.image_encoder,
        pipeline.image_normalizer,
    ):
        module.eval().requires_grad_(False)
    return TrainingResult(pipeline, seconds, len(bank.labels), len(set(bank.sources.tolist())))
