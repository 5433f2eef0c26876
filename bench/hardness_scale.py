"""Hardness statistics at ImageNet-LT scale (issue 13, item 5): fit memory and time, file size, one class's memory.

1,000 classes with ImageNet-LT's training counts (client/fgs_client/data/imagenet_lt_train_counts.csv:
115,846 images, 5 to 1,280 per class), k = 2,048 (a ResNet-50 embedding), synthetic embeddings (below). Each
measurement runs in a process of its own, so that its peak resident memory (VmHWM) is its own:

1. fit: `HardnessStats.fit_to_file`, streaming the classes (generated again, identically, for the second pass).
   Acceptance: peak RSS <= 6 GiB (the dense fit needed [n, k, k]: 3.9 TB; 1,000 dense precisions are 16.8 GB).
2. worker: `HardnessStats.load`, then Eq. 5 value and gradient for 8 embeddings of the largest class (1,280
   images: the largest factor). Acceptance: the growth of peak RSS over the process before loading <= 64 MiB.

    .venv/bin/python bench/hardness_scale.py [--dim 2048] [--threads 1] [--out /tmp/hardness-scale]

Synthetic embeddings of class y: non-negative (a ReLU embedding), a class centre in [0, 1)^k, 64 factors shared
by all classes with class-specific weights (correlated dimensions, so the pooled target is not near-diagonal),
and isotropic noise; seeded by y, so that both passes of the fit see the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS_CSV = ROOT / "client" / "fgs_client" / "data" / "imagenet_lt_train_counts.csv"
SHARED_FACTORS = 64  # low-rank structure shared by the classes (see the module docstring)


def imagenet_lt_counts() -> list[int]:
    with open(COUNTS_CSV, newline="") as handle:
        return [int(row["train_count"]) for row in csv.DictReader(handle)]


def memory_kib() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def synthetic_class_embeddings(dim: int, counts: list[int]):
    import torch

    loadings = torch.randn(SHARED_FACTORS, dim, generator=torch.Generator().manual_seed(10_000)) / SHARED_FACTORS**0.5

    def class_embeddings(y: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(y)
        centre = torch.rand(dim, generator=generator)
        weights = torch.rand(SHARED_FACTORS, generator=generator)
        factors = torch.randn(counts[y], SHARED_FACTORS, generator=generator) * weights
        noise = 0.2 * torch.randn(counts[y], dim, generator=generator)
        return (centre + factors @ loadings + noise).clamp_min(0)

    return class_embeddings


def run_fit(out: Path, dim: int) -> dict:
    from fgs_classifier.hardness_stats import HardnessStats

    counts = imagenet_lt_counts()
    start = memory_kib()
    began = time.perf_counter()
    HardnessStats.fit_to_file(out, synthetic_class_embeddings(dim, counts), counts, dim)
    seconds = time.perf_counter() - began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "fit_s": seconds,
        "fit_cpu_s": usage.ru_utime + usage.ru_stime,
        "fit_peak_rss_mib": memory_kib()["VmHWM"] / 1024,
        "rss_before_fit_mib": start["VmRSS"] / 1024,
        "file_bytes": out.stat().st_size,
        "images": sum(counts),
        "classes": len(counts),
    }


def run_worker(out: Path, dim: int) -> dict:
    import torch

    from fgs_classifier.hardness_stats import HardnessStats
    from fgs_common.wire import Criterion
    from fgs_worker.guidance import criteria

    counts = imagenet_lt_counts()
    largest = max(range(len(counts)), key=counts.__getitem__)
    queries = synthetic_class_embeddings(dim, counts)(largest)[:8].clone().requires_grad_(True)
    labels = torch.full((8,), largest)
    logits = torch.zeros(8, len(counts))
    before = memory_kib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    began = time.perf_counter()
    stats = HardnessStats.load(out)
    opened_s = time.perf_counter() - began
    value = criteria.evaluate(Criterion.hardness, logits, labels, queries, stats)
    (gradient,) = torch.autograd.grad(value.sum(), queries)
    first_s = time.perf_counter() - began
    began = time.perf_counter()
    again = criteria.evaluate(Criterion.hardness, logits, labels, queries.detach(), stats)
    cached_s = time.perf_counter() - began
    after = memory_kib()
    assert torch.isfinite(value).all() and torch.isfinite(gradient).all() and torch.equal(again, value.detach())
    return {
        "class": largest,
        "class_images": counts[largest],
        "open_s": opened_s,
        "first_score_s": first_s,
        "cached_score_s": cached_s,
        "resident_tensor_mib": stats.resident_bytes() / 2**20,
        "worker_peak_growth_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
        "hardness_mean": float(value.detach().mean()),
    }


def child(role: str, out: Path, dim: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [
        sys.executable,
        __file__,
        "--role",
        role,
        "--out",
        str(out),
        "--dim",
        str(dim),
        "--threads",
        str(threads),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{role} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048, help="embedding size k (ResNet-50: 2,048)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hardness-scale/stats.safetensors"))
    parser.add_argument("--role", choices=["fit", "worker"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps((run_fit if args.role == "fit" else run_worker)(args.out, args.dim)))
        return

    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    fit = child("fit", args.out, args.dim, args.threads)
    worker = child("worker", args.out, args.dim, args.threads)
    load_after = os.getloadavg()
    dense_gb = fit["classes"] * args.dim**2 * 4 / 1e9
    print(
        f"# bench/hardness_scale.py: {fit['classes']} classes, {fit['images']:,} images (ImageNet-LT counts), "
        f"k={args.dim}, {args.threads} torch thread(s); {platform.machine()}, {os.cpu_count()} cores; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(
        f"fit: {fit['fit_s']:.0f} s wall, {fit['fit_cpu_s']:.0f} s CPU (process total), "
        f"peak RSS {fit['fit_peak_rss_mib']:.0f} MiB "
        f"(of which {fit['rss_before_fit_mib']:.0f} MiB before the fit: Python and torch), "
        f"file {fit['file_bytes'] / 1e9:.2f} GB (dense float32 precisions: {dense_gb:.1f} GB)"
    )
    print(
        f"worker, class {worker['class']} ({worker['class_images']} images, the largest factor): "
        f"peak RSS growth {worker['worker_peak_growth_mib']:.1f} MiB, resident tensors "
        f"{worker['resident_tensor_mib']:.1f} MiB; open {worker['open_s'] * 1e3:.0f} ms, first score with gradient "
        f"{worker['first_score_s'] * 1e3:.0f} ms, cached score {worker['cached_score_s'] * 1e3:.1f} ms"
    )
    fit_ok = fit["fit_peak_rss_mib"] <= 6 * 1024
    worker_ok = worker["worker_peak_growth_mib"] <= 64
    print(
        f"acceptance: fit peak RSS <= 6 GiB: {'yes' if fit_ok else 'NO'}; "
        f"one class <= 64 MiB: {'yes' if worker_ok else 'NO'}"
    )


if __name__ == "__main__":
    main()
