"""Build a small StableUnCLIP img2img pipeline entirely offline, in the diffusers layout of SD 2.1 unCLIP.

Same components and code path as `stabilityai/stable-diffusion-2-1-unclip` (CLIP text and vision towers,
image normalizer, image-noising DDPM scheduler, UNet with a projection class embedding, VAE, DDIM), only
smaller. `fgs make-tiny-model DIR` saves it with random weights; the embedded `fgs-digits` model is the
same architecture, trained (see examples/train_fgs_digits.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

# Words that become single tokens; anything else still tokenizes, character by character.
TOKENIZER_WORDS = (
    "a an the of in on photo picture image drawing handwritten digit number "
    "zero one two three four five six seven eight nine "
    "autumn dim grass outdoor rock water "
    "red blue class"
).split()


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the small pipeline. Defaults: a few MB, fast enough for CPU tests."""

    image_size: int = 32  # pixels; latents are image_size / 4
    embed_dim: int = 32  # CLIP hidden size == image-embedding size == cross-attention size
    text_layers: int = 2
    vision_layers: int = 2
    max_length: int = 16  # tokens per prompt
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    prediction_type: str = "v_prediction"  # SD 2.1 unCLIP predicts v


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of GPT-2/CLIP BPE (same construction as openai/CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=False))


def write_tokenizer(
    directory: Path, max_length: int, words: tuple[str, ...] | list[str] = TOKENIZER_WORDS
) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) whose vocabulary is bytes plus `words` as whole tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        # Chain merges left to right: "s e", "se v", ... , "seve n</w>" so the whole word is one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            if rule not in merges:
                merges.append(rule)
            merged = merged + piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(rule.split(" ")) for rule in merges],
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def sd21_unclip_ddim_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """The sampling scheduler of stabilityai/stable-diffusion-2-1-unclip (its scheduler/scheduler_config.json)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def build_tiny_pipeline(workdir: Path, config: TinyConfig = TinyConfig(), seed: int = 0) -> StableUnCLIPImg2ImgPipeline:
    """A random-weight StableUnCLIPImg2ImgPipeline of `config` sizes (the tokenizer is written under `workdir`)."""
    tokenizer = write_tokenizer(workdir / "tokenizer", config.max_length)
    torch.manual_seed(seed)
    d = config.embed_dim
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=d,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=d,
            projection_dim=d,
            intermediate_size=2 * d,
            num_hidden_layers=config.vision_layers,
            num_attention_heads=4,
            image_size=config.image_size,
            patch_size=4,
        )
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    image_normalizer = StableUnCLIPImageNormalizer(embedding_dim=d)
    image_noising_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (len(config.vae_channels) - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(config.unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(config.unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=d,
        # unCLIP: the noise-augmented image embedding and the embedding of its noise level, concatenated.
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * d,
        use_linear_projection=True,
        norm_num_groups=8,
    )
    scheduler = sd21_unclip_ddim_scheduler(config.prediction_type)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        latent_channels=config.latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=config.image_size,
    )
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=feature_extractor,
        image_encoder=image_encoder.eval(),
        image_normalizer=image_normalizer.eval(),
        image_noising_scheduler=image_noising_scheduler,
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
    )


def save_tiny_model(directory: Path, config: TinyConfig = TinyConfig(), seed: int = 0) -> Path:
    """Build the random-weight tiny pipeline and save it (safetensors, diffusers layout) to `directory`."""
    directory = Path(directory)
    pipeline = build_tiny_pipeline(directory, config, seed)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


if __name__ == "__main__":  # `fgs make-tiny-model DIR` runs this
    save_tiny_model(Path(sys.argv[1]))
