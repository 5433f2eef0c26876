"""GPU benchmark: full-size SD 2.1 unCLIP architecture (random weights, built from its published configs; the cost
of a model does not depend on its weights), fp16 on CUDA, 768x768, 30 DDIM steps, feedback every 5 steps.

Prints images/s and peak GPU memory for diffusers' StableUnCLIPImg2ImgPipeline unguided, fgs unguided, fgs with
entropy feedback through each gradient path, and the reference loop (the paper's released code style), at
B = 1, 4, 8 (16 if memory allows); checks that fgs unguided equals diffusers for the same seeds; reports achieved
TFLOP/s against the counted FLOPs per image. `--tiny` runs the same script on the CPU with the tiny model (CI).

    python bench/gpu.py            # on a GPU machine, fits a 10-minute call
    python bench/gpu.py --tiny     # anywhere
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from fgs_classifier.registry import load_classifier
from fgs_classifier.small_cnn import random_small_cnn
from fgs_common.wire import GenerationParams
from fgs_lab.throughput import PROMPT, conditioning_image, measure, print_table
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import load_pipeline
from fgs_worker.tiny_model import write_tokenizer


def full_size_unclip(workdir: Path, device: torch.device, dtype: torch.dtype) -> StableUnCLIPImg2ImgPipeline:
    """stabilityai/stable-diffusion-2-1-unclip's architecture (ViT-H image encoder) with random weights."""
    tokenizer = write_tokenizer(workdir / "tokenizer", max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=1024,
            hidden_act="gelu",
        )
    )
    unet = UNet2DConditionModel(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        use_linear_projection=True,
        upcast_attention=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2048,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=768,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=1024),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        vae=vae,
    )
    # The same round trip as a user's copy: save, then load through fgs's loader (fp16 on CUDA).
    pipe.save_pretrained(workdir / "model", safe_serialization=True)
    return load_pipeline(str(workdir / "model"), device=device, dtype=dtype)


def flops_per_image(pipe, side: int, steps: int) -> float:
    """Counted FLOPs of one unguided image: 2 x steps UNet forwards (CFG) and one VAE decode."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latents = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
    text = torch.randn(
        1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, device=device, dtype=dtype
    )
    embeds = torch.randn(1, pipe.unet.config.projection_class_embeddings_input_dim, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        pipe.unet(latents, 10, encoder_hidden_states=text, class_labels=embeds)
    unet = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        pipe.vae.decode(latents)
    return 2 * steps * unet + counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (CI)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--omega", type=float, default=0.1)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            pipe, side, classifier_side = load_pipeline("tiny", device=device), 32, 32
            batches = args.batches or [1, 4]
        else:
            pipe, side, classifier_side = full_size_unclip(Path(tmp), device, dtype), 768, 224
            batches = args.batches or [1, 4, 8, 16]
        archive, spec = random_small_cnn(Path(tmp) / "classifier", num_classes=1000, input_size=classifier_side)
        classifier = load_classifier(archive, spec, device=device)
    sampler = GuidedDDIMSampler(pipe)
    image = conditioning_image()

    # fgs unguided must equal diffusers for the same seeds, on this device.
    seeds = [0, 1]
    ours = (
        sampler(
            prompt=PROMPT,
            class_index=7,
            conditioning_images=[image] * 2,
            seeds=seeds,
            params=GenerationParams(steps=args.steps, width=side, height=side, gamma=3.0),
        )
        .pixels.permute(0, 2, 3, 1)
        .numpy()
    )
    theirs = pipe(
        image=[image] * 2,
        prompt=[PROMPT] * 2,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=args.steps,
        guidance_scale=3.0,
        width=side,
        height=side,
        output_type="np",
    ).images
    difference = float(np.abs(ours - theirs).max())

    def diffusers_unguided(batch: int):
        return pipe(
            image=[image] * batch,
            prompt=[PROMPT] * batch,
            num_inference_steps=args.steps,
            generator=[torch.Generator().manual_seed(s) for s in range(batch)],
            guidance_scale=3.0,
            width=side,
            height=side,
            output_type="pt",
        )

    reference_ips, rows = measure(
        sampler,
        classifier,
        batches,
        side,
        args.steps,
        args.omega,
        args.repeats,
        extra_variants={"diffusers unguided": diffusers_unguided},
        warmup=args.warmup,
    )
    flops = flops_per_image(pipe, side, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print_table(
        f"# bench/gpu.py: {'tiny model' if args.tiny else 'SD 2.1 unCLIP architecture, random weights'}, "
        f"{side}x{side}px, {dtype}, {args.steps} DDIM steps, feedback every 5, classifier {classifier_side}px; "
        f"device {name}; torch {torch.__version__}",
        reference_ips,
        rows,
    )
    print(
        f"fgs unguided vs diffusers, same seeds: max abs pixel difference {difference:.2e} "
        f"({'match' if difference <= (1e-4 if dtype == torch.float32 else 2e-2) else 'MISMATCH'})"
    )
    print(f"counted FLOPs per unguided image: {flops / 1e12:.2f} TFLOP")
    for row in rows:
        if row.variant in ("fgs unguided", "diffusers unguided"):
            print(f"  {row.variant} B={row.batch}: {row.images_per_s * flops / 1e12:.2f} TFLOP/s achieved")


if __name__ == "__main__":
    main()
