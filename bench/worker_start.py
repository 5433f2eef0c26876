"""A worker's start-up CPU before it touches Redis: `import fgs_worker.main` and loading the model, with the
collector off during the imports (as the worker ships) against the same code with the collector left on.

Each start is a fresh interpreter (`python -c`), as `fgs up` starts one; the two kinds alternate, so that a change
in the machine's load falls on both. The baseline turns `gc.disable` into a no-op before the import, so it runs
the same files. Prints the CPU (user + system) and wall seconds of each phase, mean and standard error over the
repeats, and the ratio of the means.

    .venv/bin/python bench/worker_start.py [--model tiny] [--repeats 6]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = """
import gc, json, resource, sys, time
if sys.argv[1] == "collector on":
    gc.disable = lambda: None
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
cpu0, wall0 = cpu(), time.perf_counter()
import fgs_worker.main
from fgs_worker.model_loading import load_pipeline
imported = {"import_cpu": cpu() - cpu0, "import_wall": time.perf_counter() - wall0, "collecting": gc.isenabled()}
load_pipeline(sys.argv[2], device="cpu")
print(json.dumps(imported | {"total_cpu": cpu() - cpu0, "total_wall": time.perf_counter() - wall0}))
"""
KINDS = ("collector on", "as shipped")


def start(kind: str, model: str) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the test suite's workers (tests/support/stack.py)
    done = subprocess.run([sys.executable, "-c", CHILD, kind, model], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"a {kind!r} start failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row.pop("collecting"), f"{kind}: the collector must be on again once the worker has imported"
    return row


def mean_se(values: list[float]) -> str:
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) / len(values) ** 0.5:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built in memory) or a model directory")
    parser.add_argument("--repeats", type=int, default=6, help="starts of each kind (at least 2: the SE)")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the standard error needs two starts)")
    start("as shipped", args.model)  # warm-up: page cache and .pyc files
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            runs[kind].append(start(kind, args.model))
    print(
        f"# bench/worker_start.py: model={args.model}, {args.repeats} starts of each kind, alternating; "
        f"torch {importlib.metadata.version('torch')}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print("| phase | measure | collector on (s) | as shipped (s) | as shipped / collector on |")
    print("|---|---|---|---|---|")
    for phase, key in (("import fgs_worker.main", "import"), ("import + load model", "total")):
        for measure in ("cpu", "wall"):
            values = {kind: [run[f"{key}_{measure}"] for run in runs[kind]] for kind in KINDS}
            ratio = statistics.mean(values["as shipped"]) / statistics.mean(values["collector on"])
            cells = " | ".join(mean_se(values[kind]) for kind in KINDS)
            print(f"| {phase} | {measure} | {cells} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
