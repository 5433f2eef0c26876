"""GPU benchmark, one script for one GPU loan: full-size SD 2.1 unCLIP architecture (random weights, built from its
published configs; the cost of a model does not depend on its weights), 768x768, 30 DDIM steps, feedback every 5
steps, in the worker's dtype (FGS_DTYPE's rule: float16 on CUDA unless --dtype says otherwise).

Prints images/s and peak GPU memory for diffusers' StableUnCLIPImg2ImgPipeline unguided, fgs unguided, fgs with
entropy feedback through each gradient path, and the reference loop (the paper's released code style), at
B = 1, 4, 8, 16 (as memory allows); checks that fgs unguided equals diffusers for the same seeds; reports achieved
TFLOP/s against the counted FLOPs per image. Every row carries its ratio to diffusers unguided at the same batch.

Speed switches (--switches, each measured alone at the largest batch, then undone; compile last, as it stays):
channels-last UNet, an SDPA backend (sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math), another dtype
(bfloat16, float16, float32: the whole model cast), compile (torch.compile of the UNet). A switch the device
cannot run is reported as unavailable, with torch's reason. --batching adds cross-job batching
(`cross_job_batching_variants`, the one place to put that measurement).

Time guard: no new measurement starts after 80% of --budget-s (default 690 s, counted after the imports, which
take 10-30 s), and at --budget-s the one in flight is abandoned; the table of what was measured is always
printed, so a 15-minute loan (model build, warm-up and table included) ends with a table.

    python bench/gpu.py --switches channels-last sdpa-flash sdpa-efficient bfloat16 compile   # GPU, ~12 min
    python bench/gpu.py --tiny     # anywhere (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from torch.nn.attention import SDPBackend, sdpa_kernel
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
from fgs_lab.throughput import (
    DIFFUSERS_UNGUIDED,
    PROMPT,
    Row,
    conditioning_image,
    measure,
    print_table,
    sampler_variants,
    timed,
)
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import MODEL_DTYPES, load_pipeline, model_dtype
from fgs_worker.tiny_model import sd21_unclip_ddim_scheduler, write_tokenizer

ARCHITECTURE = Path(__file__).with_name("sd21_unclip_architecture.json")


def full_size_unclip(workdir: Path, device: torch.device, dtype: torch.dtype) -> StableUnCLIPImg2ImgPipeline:
    """stabilityai/stable-diffusion-2-1-unclip's architecture (ViT-H image encoder) with random weights."""
    tokenizer = write_tokenizer(workdir / "tokenizer", max_length=77)
    architecture = json.loads(ARCHITECTURE.read_text())
    special_tokens = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**architecture["text_encoder"], **special_tokens))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**architecture["image_encoder"]))
    unet = UNet2DConditionModel(**architecture["unet"])
    vae = AutoencoderKL(**architecture["vae"])
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=1024),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=sd21_unclip_ddim_scheduler(),
        vae=vae,
    )
    # The same round trip as a user's copy: save, then load through fgs's loader, in the worker's dtype.
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


def unguided_difference(sampler: GuidedDDIMSampler, side: int, steps: int) -> float:
    """Max abs pixel difference between fgs unguided and diffusers' pipeline for the same seeds (should be ~0)."""
    pipe, image, seeds = sampler.pipeline, conditioning_image(), [0, 1]
    ours = (
        sampler(
            prompt=PROMPT,
            class_index=7,
            conditioning_images=[image] * 2,
            seeds=seeds,
            params=GenerationParams(steps=steps, width=side, height=side, gamma=3.0),
        )
        .pixels.permute(0, 2, 3, 1)
        .numpy()
    )
    theirs = pipe(
        image=[image] * 2,
        prompt=[PROMPT] * 2,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=steps,
        guidance_scale=3.0,
        width=side,
        height=side,
        output_type="np",
    ).images
    return float(np.abs(ours - theirs).max())


SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
SWITCHES = ("channels-last", *SDPA_BACKENDS, *MODEL_DTYPES, "compile")


class BudgetExhausted(Exception):
    """The loan's time is up: stop measuring and print what there is."""


@contextlib.contextmanager
def speed_switch(pipe: StableUnCLIPImg2ImgPipeline, name: str, compile_backend: str) -> Iterator[None]:
    """The pipeline with one speed switch on, undone on the way out (except compile: measure it last)."""
    if name == "channels-last":
        pipe.unet.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            pipe.unet.to(memory_format=torch.contiguous_format)
    elif name in SDPA_BACKENDS:
        with sdpa_kernel(SDPA_BACKENDS[name]):
            yield
    elif name in MODEL_DTYPES:
        before = pipe.unet.dtype
        pipe.to(dtype=MODEL_DTYPES[name])
        try:
            yield
        finally:
            pipe.to(dtype=before)
    elif name == "compile":
        pipe.unet.compile(backend=compile_backend)  # in place: the sampler and diffusers call the same module
        yield
    else:
        raise ValueError(f"unknown speed switch {name!r}: one of {', '.join(SWITCHES)}")


def cross_job_batching_variants(
    sampler: GuidedDDIMSampler, classifier, side: int, steps: int, omega: float
) -> dict[str, Callable[[int], object]]:
    """Variants that time B one-image jobs sampled together by the worker's cross-job batching (issue 15, item 1),
    by name (each starting 'cross-job batching'), each f(B) like the table's other variants.

    The call is the one fgs_worker.jobs makes for a shared batch (fgs_worker.shared_batch): every image with its
    own prompt, class, seed, conditioning image (a distinct upload each, encoded once each), γ and ω.
    """

    def jobs(batch: int, criterion: str, job_omega: float):
        params = [
            GenerationParams(
                criterion=criterion,
                omega=job_omega * (1 + i % 2),
                gamma=3.0 + i % 2,
                steps=steps,
                guidance_every=5,
                width=side,
                height=side,
                feedback_input="x0",
            )
            for i in range(batch)
        ]
        return sampler(
            prompt=[f"{PROMPT} {i}" for i in range(batch)],
            class_index=[i % classifier.num_classes for i in range(batch)],
            conditioning_images=[conditioning_image() for _ in range(batch)],
            seeds=list(range(batch)),
            params=params,
            classifier=classifier if criterion != "none" else None,
        )

    return {
        "cross-job batching unguided": lambda b: jobs(b, "none", 0.0),
        "cross-job batching entropy unet/full": lambda b: jobs(b, "entropy", omega),
    }


def switch_rows(
    name: str,
    pipe: StableUnCLIPImg2ImgPipeline,
    runs: dict[str, Callable[[int], object]],
    batch: int,
    baseline: dict[str, Row],
    reference_ips: float,
    args: argparse.Namespace,
    deadline: float,
) -> list[Row]:
    """`runs` timed at `batch` with the switch `name` on; ratios to the reference loop, fgs unguided and diffusers
    unguided as measured without it."""
    rows = []
    with speed_switch(pipe, name, args.compile_backend):
        for variant, run in runs.items():
            if time.monotonic() > deadline:
                break
            seconds, peak = timed(lambda run=run: run(batch), args.repeats, pipe.unet.device, args.warmup)
            ips = batch / seconds
            rows.append(
                Row(
                    f"{variant} +{name}",
                    batch,
                    ips,
                    ips / reference_ips,
                    ips / baseline["fgs unguided"].images_per_s,
                    peak,
                    ips / baseline[DIFFUSERS_UNGUIDED].images_per_s,
                )
            )
    return rows


def _budget_exhausted(signum, frame):
    raise BudgetExhausted


def main() -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (CI)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--omega", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["auto", *MODEL_DTYPES], default="auto", help="as FGS_DTYPE")
    parser.add_argument("--switches", nargs="*", choices=SWITCHES, default=[], help="speed switches to measure")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile switch")
    parser.add_argument("--batching", action="store_true", help="also measure cross-job batching")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=690.0,
        help="wall-clock budget from start: 11.5 min leaves a 15-minute loan its start-up and the copy back",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = model_dtype(args.dtype, device)
    deadline = started + 0.8 * args.budget_s  # no new measurement after this
    signal.signal(signal.SIGALRM, _budget_exhausted)
    signal.alarm(max(1, int(args.budget_s - (time.monotonic() - started))))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            pipe, side, classifier_side = load_pipeline("tiny", device=device, dtype=dtype), 32, 32
            batches = args.batches or [1, 4]
        else:
            pipe, side, classifier_side = full_size_unclip(Path(tmp), device, dtype), 768, 224
            batches = args.batches or [1, 4, 8, 16]
        archive, spec = random_small_cnn(Path(tmp) / "classifier", num_classes=1000, input_size=classifier_side)
        classifier = load_classifier(archive, spec, device=device)
    sampler = GuidedDDIMSampler(pipe)
    image = conditioning_image()
    print(f"model built and loaded in {time.monotonic() - started:.0f} s", flush=True)

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

    extra_variants = {DIFFUSERS_UNGUIDED: diffusers_unguided}
    if args.batching:
        batching = cross_job_batching_variants(sampler, classifier, side, args.steps, args.omega)
        if not batching:
            print("cross-job batching: not measured (its engine is not in this tree; cross_job_batching_variants)")
        extra_variants.update(batching)
    rows: list[Row] = []
    reference_ips = difference = flops = None
    unfinished = ""
    try:
        # fgs unguided must equal diffusers for the same seeds, on this device.
        difference = unguided_difference(sampler, side, args.steps)
        flops = flops_per_image(pipe, side, args.steps)
        reference_ips, _ = measure(
            sampler,
            classifier,
            batches,
            side,
            args.steps,
            args.omega,
            args.repeats,
            extra_variants=extra_variants,
            warmup=args.warmup,
            deadline=deadline,
            rows=rows,
        )
        measured = {(row.variant, row.batch) for row in rows}
        both = [b for b in batches if {(DIFFUSERS_UNGUIDED, b), ("fgs unguided", b)} <= measured]
        largest = max(both, default=None)  # the switches' batch: the largest that both baselines ran at
        baseline = {row.variant: row for row in rows if row.batch == largest}
        # The service's default gradient path and feedback resolution, and fgs unguided, with each switch.
        default = GenerationParams()
        switched = ["fgs unguided", f"fgs entropy {default.gradient_path.value}/{default.feedback_resolution.value}"]
        variants = sampler_variants(sampler, classifier, side, args.steps, args.omega)
        runs = {variant: variants[variant] for variant in switched}
        for name in sorted(args.switches, key=lambda name: name == "compile"):
            if largest is None or time.monotonic() > deadline:
                unfinished += f" switch {name} not measured (budget);"
                continue
            try:
                rows += switch_rows(name, pipe, runs, largest, baseline, reference_ips, args, deadline)
            except (RuntimeError, torch.OutOfMemoryError) as error:  # e.g. no flash kernel for this device/dtype
                unfinished += f" switch {name} unavailable: {' '.join(str(error).split())[:160]};"
    except BudgetExhausted:
        unfinished += f" stopped at the {args.budget_s:.0f} s budget, mid-measurement;"
    finally:
        signal.alarm(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print_table(
        f"# bench/gpu.py: {'tiny model' if args.tiny else 'SD 2.1 unCLIP architecture, random weights'}, "
        f"{side}x{side}px, {dtype}, {args.steps} DDIM steps, feedback every 5, classifier {classifier_side}px "
        f"(float32); device {name}; torch {torch.__version__}; {time.monotonic() - started:.0f} s",
        reference_ips or float("nan"),
        rows,
    )
    print("rows '+switch': one speed switch on; every ratio is to a variant measured without it")
    if unfinished:
        print(f"unfinished:{unfinished}")
    if difference is not None:
        print(
            f"fgs unguided vs diffusers, same seeds: max abs pixel difference {difference:.2e} "
            f"({'match' if difference <= (1e-4 if dtype == torch.float32 else 2e-2) else 'MISMATCH'})"
        )
    if flops is not None:
        print(f"counted FLOPs per unguided image: {flops / 1e12:.2f} TFLOP")
        for row in rows:
            if row.variant in ("fgs unguided", DIFFUSERS_UNGUIDED):
                print(f"  {row.variant} B={row.batch}: {row.images_per_s * flops / 1e12:.2f} TFLOP/s achieved")


if __name__ == "__main__":
    main()
