"""`python -m fgs_worker.classifier_child`: a tenant's classifier at run time, confined, serving its worker.

Started by fgs_worker.confined_classifier, one per loaded classifier. In order, before it reads anything the
tenant made:
1. it dies with its parent (PR_SET_PDEATHSIG), and quits if the parent is already gone;
2. it confines itself as the upload check does (fgs_common.classifier_sandbox.confine_this_process: address
   space, CPU time, file size, no network), with the run-time memory limit;
then it loads the classifier from the archive its parent hands it as an open file (the same loader, graph check
and spec check as everywhere: fgs_classifier.registry), and serves calls until its parent closes the pipe.

Its parent writes each call's images into shared memory (a memfd mapped on both sides) and a one-line JSON
request on a pipe; the child answers with a one-line JSON reply and the results in the same shared memory,
float32 throughout:

    [ images [B, C, H, W] in; dC/dimages out | C [B] | softmax [B, K] (score calls) ]

What the classifier prints goes to a file its parent reads, bounds and empties; never to the worker's log.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys

from fgs_common.classifier_sandbox import confine_this_process, die_with_parent

# Largest output of the classifier's process (its stdout and stderr file, emptied by the parent after each call).
MAX_OUTPUT_BYTES = 1024 * 1024


class _Shared:
    """The memfd shared with the parent, mapped again whenever the parent has grown it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.map: mmap.mmap | None = None

    def floats(self, count: int):
        import torch

        needed = 4 * count
        if self.map is None or len(self.map) < needed:
            self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        if len(self.map) < needed:
            raise ValueError("the shared memory is smaller than the request says")
        return torch.frombuffer(self.map, dtype=torch.float32, count=count)


def _serve_one(request: dict, classifier, shared: _Shared) -> None:
    import torch

    from fgs_common.wire import Criterion
    from fgs_worker.guidance.feedback_classifier import criterion_and_gradient, score

    batch, channels, height, width = (int(n) for n in request["shape"])
    count = batch * channels * height * width
    classes = classifier.spec.num_classes
    floats = shared.floats(count + batch + batch * classes)
    pixels = floats[:count].view(batch, channels, height, width).clone()
    labels = torch.tensor(request["labels"], dtype=torch.long)
    criterion = Criterion(request["criterion"])
    if request["op"] == "gradient":
        values, gradient = criterion_and_gradient(classifier, pixels, criterion, labels)
        floats[:count] = gradient.reshape(-1).float()
        floats[count : count + batch] = values.float()
    else:
        values, probabilities = score(classifier, pixels, criterion, labels)
        floats[count : count + batch] = torch.tensor(values if values is not None else [float("nan")] * batch)
        floats[count + batch :] = torch.tensor(probabilities, dtype=torch.float32).reshape(-1)


def _error_reply(error: BaseException, memory_bytes: int) -> dict:
    from fgs_classifier.check import _is_out_of_memory

    if _is_out_of_memory(error):
        return {"ok": False, "error": "memory", "message": f"more than {memory_bytes // 2**20} MiB"}
    text = " ".join(str(error).split())
    return {"ok": False, "error": "raised", "message": f"{type(error).__name__}: {text[:300]}"}


def _load(args: argparse.Namespace, request: dict):
    from pathlib import Path

    from fgs_classifier.registry import load_classifier
    from fgs_common.wire import ClassifierSpec

    spec = ClassifierSpec.model_validate(request["spec"])
    stats = Path(f"/proc/self/fd/{args.stats_fd}") if args.stats_fd is not None else None
    return load_classifier(
        Path(f"/proc/self/fd/{args.archive_fd}"), spec, stats, device="cpu", max_unpacked_bytes=args.max_unpacked_bytes
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgs_worker.classifier_child")
    for name in ("--parent-pid", "--control-in", "--control-out", "--shared", "--archive-fd"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--stats-fd", type=int)
    parser.add_argument("--memory-bytes", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    parser.add_argument("--max-unpacked-bytes", type=int, required=True)
    parser.add_argument("--require-network-isolation", action="store_true")
    args = parser.parse_args(argv)

    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    isolated = confine_this_process(args.memory_bytes, args.cpu_seconds, MAX_OUTPUT_BYTES)
    # Output past MAX_OUTPUT_BYTES is dropped (the write fails), rather than ending the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    requests = os.fdopen(args.control_in, "r", encoding="utf-8")
    replies = os.fdopen(args.control_out, "w", encoding="utf-8")

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    first = json.loads(requests.readline() or "{}")
    if not isolated and args.require_network_isolation:
        reply({"ok": False, "error": "load", "message": "this host refuses a network namespace"})
        return 2
    try:
        classifier = _load(args, first)
    except Exception as error:
        reply({"ok": False, "error": "load", "message": _error_reply(error, args.memory_bytes)["message"]})
        return 2
    reply({"ok": True, "network_isolated": isolated})
    shared = _Shared(args.shared)
    for line in requests:
        try:
            _serve_one(json.loads(line), classifier, shared)
        except Exception as error:
            reply(_error_reply(error, args.memory_bytes))
            continue
        reply({"ok": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
