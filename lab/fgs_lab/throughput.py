"""Shared measurement for bench/sampler.py (CPU, tiny model) and bench/gpu.py (GPU, full-size SD 2.1 unCLIP).

Images per second of each sampler variant at each batch size, in one process on one model, with ratios
against the reference loop (the paper's released code style, fgs_lab/reference_loop.py), the feedback
overhead against fgs unguided at the same batch size, and, where the caller times it, the ratio to diffusers'
unguided pipeline at the same batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from fgs_classifier.registry import LoadedClassifier
from fgs_common.wire import GenerationParams
from fgs_lab.reference_loop import reference_guided_image
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler

PROMPT = "a handwritten digit seven"
DIFFUSERS_UNGUIDED = "diffusers unguided"  # the variant `vs_diffusers` divides by, when the caller adds it


@dataclass
class Row:
    variant: str
    batch: int
    images_per_s: float
    vs_reference: float
    vs_fgs_unguided: float | None
    peak_memory_gb: float | None
    vs_diffusers: float | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    function: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1
) -> tuple[float, float | None]:
    """Best wall time of `repeats` runs after `warmup` runs, and peak GPU memory (GB) where there is a GPU."""
    for _ in range(warmup):
        function()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return best, peak


def conditioning_image(side: int = 224) -> PIL.Image.Image:
    rng = np.random.RandomState(0)
    return PIL.Image.fromarray((rng.rand(side, side, 3) * 255).astype(np.uint8))


def sampler_variants(
    sampler: GuidedDDIMSampler,
    classifier: LoadedClassifier,
    side: int,
    steps: int,
    omega: float,
    gradient_variants: list[tuple[str, str]] | None = None,
) -> dict[str, Callable[[int], object]]:
    """fgs unguided and fgs entropy through each (gradient path, feedback resolution), by name, each f(batch)."""
    common = dict(prompt=PROMPT, class_index=7, conditioning_images=[conditioning_image()])
    # the reference loop scores the decoded x0 with γ 3: compare like with like, whatever the service's defaults
    params = GenerationParams(gamma=3.0, steps=steps, guidance_every=5, width=side, height=side, feedback_input="x0")
    gradient_variants = gradient_variants or [(p, r) for p in ("unet", "constant_eps") for r in ("full", "classifier")]
    variants: dict[str, Callable[[int], object]] = {
        "fgs unguided": lambda b: sampler(seeds=list(range(b)), params=params, **common)
    }
    for path, resolution in gradient_variants:
        guided = GenerationParams(
            **{
                **params.model_dump(),
                "criterion": "entropy",
                "omega": omega,
                "gradient_path": path,
                "feedback_resolution": resolution,
            }
        )
        variants[f"fgs entropy {path}/{resolution}"] = lambda b, guided=guided: sampler(
            seeds=list(range(b)), params=guided, classifier=classifier, **common
        )
    return variants


def measure(
    sampler: GuidedDDIMSampler,
    classifier: LoadedClassifier,
    batches: list[int],
    side: int,
    steps: int,
    omega: float,
    repeats: int,
    extra_variants: dict[str, Callable[[int], object]] | None = None,
    gradient_variants: list[tuple[str, str]] | None = None,
    warmup: int = 1,
    deadline: float | None = None,
    rows: list[Row] | None = None,
) -> tuple[float, list[Row]]:
    """Reference images/s and a Row per (variant, batch). `extra_variants` map a name to f(batch) (e.g. diffusers).

    Rows are appended to `rows` as they are measured (a caller interrupted mid-way keeps them); past `deadline`
    (time.monotonic()) the remaining variants are skipped.
    """
    device = sampler.device
    image = conditioning_image()
    n_reference = max(1, min(max(batches), 4))

    def reference() -> None:
        for seed in range(n_reference):
            reference_guided_image(sampler.pipeline, classifier, PROMPT, 7, image, seed, omega, steps=steps, side=side)

    reference_s = timed(reference, repeats, device, warmup)[0] / n_reference
    variants = dict(extra_variants or {})
    variants.update(sampler_variants(sampler, classifier, side, steps, omega, gradient_variants))
    rows = [] if rows is None else rows
    for batch in batches:
        unguided_s = diffusers_s = None
        for name, run in variants.items():
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                seconds, peak = timed(lambda run=run, batch=batch: run(batch), repeats, device, warmup)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            seconds /= batch
            if name == "fgs unguided":
                unguided_s = seconds
            if name == DIFFUSERS_UNGUIDED:
                diffusers_s = seconds
            rows.append(
                Row(
                    name,
                    batch,
                    1 / seconds,
                    reference_s / seconds,
                    None if unguided_s is None else unguided_s / seconds,
                    peak,
                    None if diffusers_s is None else diffusers_s / seconds,
                )
            )
    return 1 / reference_s, rows


def print_table(title: str, reference_ips: float, rows: list[Row]) -> None:
    print(title)
    print(f"reference loop (paper's released code style, one image per call): {reference_ips:.3f} images/s")
    print(
        f"| {'variant':<48} | {'B':>2} | {'images/s':>9} | {'x reference':>11} | {'x fgs unguided':>14} | "
        f"{'x diffusers':>11} | {'peak GB':>7} |"
    )
    print(f"|{'-' * 50}|{'-' * 4}|{'-' * 11}|{'-' * 13}|{'-' * 16}|{'-' * 13}|{'-' * 9}|")
    for row in rows:
        unguided = "" if row.vs_fgs_unguided is None else f"{row.vs_fgs_unguided:.2f}"
        diffusers = "" if row.vs_diffusers is None else f"{row.vs_diffusers:.2f}"
        peak = "" if row.peak_memory_gb is None else f"{row.peak_memory_gb:.1f}"
        print(
            f"| {row.variant:<48} | {row.batch:>2} | {row.images_per_s:>9.3f} | {row.vs_reference:>11.2f} | "
            f"{unguided:>14} | {diffusers:>11} | {peak:>7} |"
        )
