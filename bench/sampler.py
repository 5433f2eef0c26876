"""Images per second of the guided sampler on the tiny model (CPU), against unguided sampling and the reference loop.

Each gradient path (unet / constant_eps) and feedback resolution (full / classifier) at B = 1, 4, 8, all in one
process: ratios against the reference loop (the paper's released code style, one image per call) and against
fgs unguided at the same B (a ratio below 1 is the cost of feedback).

    .venv/bin/python bench/sampler.py [--side 64] [--batches 1 4 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from fgs_classifier.registry import load_classifier
from fgs_classifier.small_cnn import random_small_cnn
from fgs_lab.throughput import measure, print_table
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels; the classifier's input is 32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--omega", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    sampler = GuidedDDIMSampler(load_pipeline(args.model, device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        archive, spec = random_small_cnn(Path(tmp), num_classes=10, input_size=32)
        classifier = load_classifier(archive, spec)
    reference_ips, rows = measure(sampler, classifier, args.batches, args.side, args.steps, args.omega, args.repeats)
    print_table(
        f"# bench/sampler.py: model={args.model} {args.side}x{args.side}px, {args.steps} DDIM steps, feedback every 5, "
        f"classifier input 32px; torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads",
        reference_ips,
        rows,
    )


if __name__ == "__main__":
    main()
