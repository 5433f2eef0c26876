"""Overhead of the confined classifier per guided step on fgs-digits (CPU), against the classifier in process.

The same guided sampler call (feedback at every step) runs with the classifier in this process
(`InProcessClassifier`, the baseline) and in its confined child (`ConfinedClassifier`, what a worker runs),
alternating, in one process. Prints the time per guided step of each, the overhead as a fraction of a guided step
(mean and standard error over the repeats), the same for one classifier call alone, and the child's peak address
space (the provenance of FGS_CLASSIFIER_RUN_MEMORY_BYTES).

    .venv/bin/python bench/confined_classifier.py [--batch 8] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fgs_classifier.registry import load_classifier
from fgs_classifier.small_cnn import random_small_cnn
from fgs_common.settings import Settings
from fgs_common.wire import Criterion, GenerationParams
from fgs_worker.confined_classifier import ConfinedClassifier
from fgs_worker.guidance.feedback_classifier import InProcessClassifier
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import load_pipeline


def mean_and_error(values: list[float]) -> tuple[float, float]:
    error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return statistics.fmean(values), error


def seconds_per_step(sampler, classifier, batch: int, params: GenerationParams) -> float:
    began = time.perf_counter()
    sampler(
        prompt="a handwritten digit three",
        class_index=3,
        seeds=list(range(batch)),
        params=params,
        classifier=classifier,
    )
    return (time.perf_counter() - began) / params.steps


def seconds_per_call(classifier, pixels: torch.Tensor, labels: torch.Tensor, calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        classifier.criterion_and_gradient(pixels, Criterion.entropy, labels)
    return (time.perf_counter() - began) / calls


def peak_address_space(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split(":", 1)[1].strip() for line in status if line.startswith("VmPeak"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the child runs one thread (the sandbox's OMP_NUM_THREADS): the same here
    torch.manual_seed(0)
    sampler = GuidedDDIMSampler(load_pipeline("fgs-digits", device="cpu"))
    params = GenerationParams(
        steps=args.steps, guidance_every=1, criterion=Criterion.entropy, omega=0.1, feedback_resolution="classifier"
    )
    with tempfile.TemporaryDirectory() as tmp:
        archive, spec = random_small_cnn(Path(tmp), num_classes=10, input_size=32)
        in_process = InProcessClassifier(load_classifier(archive, spec))
        confined = ConfinedClassifier(archive, spec, None, Settings())  # reads the archive through its open file
        confined.start()
    try:
        seconds_per_step(sampler, in_process, args.batch, params)  # warm-up, both
        seconds_per_step(sampler, confined, args.batch, params)
        steps = {"in process": [], "confined": []}
        for _ in range(args.repeats):
            steps["in process"].append(seconds_per_step(sampler, in_process, args.batch, params))
            steps["confined"].append(seconds_per_step(sampler, confined, args.batch, params))
        side = spec.input_size
        pixels = torch.rand(args.batch, 3, side, side)
        labels = torch.full((args.batch,), 3)
        calls = {"in process": [], "confined": []}
        for _ in range(args.repeats):
            calls["in process"].append(seconds_per_call(in_process, pixels, labels, args.calls))
            calls["confined"].append(seconds_per_call(confined, pixels, labels, args.calls))
        peak = peak_address_space(confined._process.pid)
    finally:
        confined.close()
    overhead = [c - i for c, i in zip(steps["confined"], steps["in process"], strict=True)]
    ratio = [o / i for o, i in zip(overhead, steps["in process"], strict=True)]
    call_overhead = [c - i for c, i in zip(calls["confined"], calls["in process"], strict=True)]
    print(
        f"# bench/confined_classifier.py: fgs-digits, batch {args.batch}, {args.steps} steps with feedback at every "
        f"step (entropy, decode at the classifier's {side} px), SmallCNN 10 classes; {args.repeats} alternating "
        f"repeats; torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread"
    )
    for name, values in steps.items():
        mean, error = mean_and_error(values)
        print(f"guided step, classifier {name:10s}: {1000 * mean:8.2f} ms +- {1000 * error:.2f}")
    mean, error = mean_and_error(ratio)
    print(f"overhead per guided step: {100 * mean:+.1f} % +- {100 * error:.1f} (target <= 10 %)")
    for name, values in calls.items():
        mean, error = mean_and_error(values)
        print(f"one classifier call (forward, C, backward), {name:10s}: {1000 * mean:7.3f} ms +- {1000 * error:.3f}")
    mean, error = mean_and_error(call_overhead)
    print(f"overhead per call (shared memory, pipe, copies): {1000 * mean:.3f} ms +- {1000 * error:.3f}")
    print(f"child's peak address space (VmPeak): {peak}")


if __name__ == "__main__":
    main()
