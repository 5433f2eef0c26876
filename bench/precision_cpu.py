"""Guided-step time in bfloat16 and float16 against float32, on this machine's CPU, in one process.

One sampler call of `--steps` steps with feedback at every step (criterion entropy) is nearly all guided steps;
its time / steps is the guided-step time. The model's copies share the same weights, cast (FGS_DTYPE's three
values); the classifier is float32 throughout, as in the worker. Variants are interleaved, best of `--repeats`.

    python bench/precision_cpu.py                 # the embedded fgs-digits model, batch 8
    python bench/precision_cpu.py --model tiny
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from fgs_classifier.registry import load_classifier
from fgs_classifier.small_cnn import random_small_cnn
from fgs_common.wire import GenerationParams
from fgs_lab.throughput import PROMPT, conditioning_image, timed
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import EMBEDDED_MODEL, MODEL_DTYPES, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samplers = {
        name: GuidedDDIMSampler(load_pipeline(args.model, device="cpu", dtype=dtype))
        for name, dtype in MODEL_DTYPES.items()
    }
    side = samplers["float32"].image_size(GenerationParams())[0]
    with tempfile.TemporaryDirectory() as tmp:
        archive, spec = random_small_cnn(Path(tmp), num_classes=10, input_size=side)
        classifier = load_classifier(archive, spec)
    image = conditioning_image()
    seconds: dict[tuple[str, str], float] = {}
    for repeat in range(args.repeats):
        for path in ("unet", "constant_eps"):
            params = GenerationParams(
                criterion="entropy", omega=0.3, steps=args.steps, guidance_every=1, gradient_path=path
            )
            for name, sampler in samplers.items():

                def call(sampler=sampler, params=params):
                    sampler(
                        prompt=PROMPT,
                        class_index=7,
                        conditioning_images=[image],
                        seeds=list(range(args.batch)),
                        params=params,
                        classifier=classifier,
                    )

                best = timed(call, 1, torch.device("cpu"), warmup=1 if repeat == 0 else 0)[0] / args.steps
                seconds[path, name] = min(seconds.get((path, name), best), best)
    print(
        f"# bench/precision_cpu.py: {args.model}, {side}x{side}px, batch {args.batch}, {args.steps} steps all "
        f"guided (entropy), best of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"| {'gradient path':<13} | {'dtype':<8} | {'s per guided step':>17} | {'x float32':>9} |")
    print(f"|{'-' * 15}|{'-' * 10}|{'-' * 19}|{'-' * 11}|")
    for (path, name), value in seconds.items():
        print(f"| {path:<13} | {name:<8} | {value:>17.4f} | {seconds[path, 'float32'] / value:>9.2f} |")


if __name__ == "__main__":
    main()
