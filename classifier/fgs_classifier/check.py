"""`python -m fgs_classifier.check --result FILE [limits] ARCHIVE SPEC_JSON [HARDNESS_STATS]`.

Loads a classifier as a worker would and runs it once, inside the sandbox that `fgs_common.classifier_sandbox`
describes: the first thing it does is tie its life to its parent's (PR_SET_PDEATHSIG) and confine itself (memory,
CPU time, file size, no network), before torch is imported or the archive read. It writes its verdict as JSON to
FILE: {"code", "message", "network_isolated"}, code "ok" or the error code a client sees. The message is ours;
torch's own text appears only as a short detail.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from fgs_common.classifier_sandbox import confine_this_process, die_with_parent

# What a file written by the check may hold at most: the verdict (the log's own size is bounded the same way).
_MAX_FILE_BYTES = 16 * 1024 * 1024


# How an allocation refused by the address-space limit reads when it is not a MemoryError: torch's allocator,
# C++'s std::bad_alloc, and the loader mapping a shared library while torch is imported.
_OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "out of memory", "bad_alloc", "failed to map segment")


def _is_out_of_memory(error: BaseException | None) -> bool:
    """Whether an allocation failed (the address-space limit), anywhere in the chain of causes."""
    while error is not None:
        text = str(error)
        if isinstance(error, MemoryError) or any(sign in text for sign in _OUT_OF_MEMORY_SIGNS):
            return True
        error = error.__cause__
    return False


def _verdict(args: argparse.Namespace) -> tuple[str, str]:
    from fgs_classifier.registry import load_classifier
    from fgs_common.exceptions import InvalidClassifier, UnsafeClassifier
    from fgs_common.wire import ClassifierSpec

    try:
        spec = ClassifierSpec.model_validate_json(Path(args.spec).read_text())
    except (OSError, ValueError) as error:  # the spec is the caller's own text: its problem can be shown
        return "invalid_classifier_spec", f"the classifier spec could not be read: {' '.join(str(error).split())}"
    stats = Path(args.stats) if args.stats else None
    try:
        load_classifier(Path(args.archive), spec, stats, device="cpu", max_unpacked_bytes=args.max_unpacked_bytes)
    except UnsafeClassifier as error:
        return "unsafe_classifier_archive", str(error)
    except (InvalidClassifier, MemoryError, RuntimeError) as error:
        if _is_out_of_memory(error):
            return "classifier_resource_limit", (
                f"classifier needs more than the check's {args.memory_bytes // 2**20} MiB of memory "
                "(FGS_CLASSIFIER_CHECK_MEMORY_BYTES)"
            )
        if isinstance(error, InvalidClassifier):
            return "classifier_mismatch", " ".join(str(error).split())
        raise
    return "ok", "ok"


def _unexpected(error: Exception, memory_bytes: int) -> tuple[str, str]:
    """A failure load_classifier does not name: say which kind, never its text (a classifier chooses what its
    errors say, and a hostile one would put a host file's bytes there); the traceback goes to the service log."""
    traceback.print_exc()
    if _is_out_of_memory(error):
        return "classifier_resource_limit", (
            f"classifier check needs more than its {memory_bytes // 2**20} MiB of memory "
            "(FGS_CLASSIFIER_CHECK_MEMORY_BYTES)"
        )
    return "classifier_check_failed", (
        f"loading or running the classifier failed with {type(error).__name__}: the archive may be damaged, or "
        "made by a torch newer than the service's; the service log has the details"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgs_classifier.check")
    parser.add_argument("--result", required=True)
    parser.add_argument("--memory-bytes", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    parser.add_argument("--max-unpacked-bytes", type=int, required=True)
    parser.add_argument("--require-network-isolation", action="store_true")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("archive")
    parser.add_argument("spec")
    parser.add_argument("stats", nargs="?")
    args = parser.parse_args(argv)

    die_with_parent(args.parent_pid)
    isolated = confine_this_process(args.memory_bytes, args.cpu_seconds, _MAX_FILE_BYTES)
    if not isolated and args.require_network_isolation:
        code, message = (
            "classifier_check_unavailable",
            (
                "classifier checks need a network namespace and this host refuses one "
                "(FGS_CLASSIFIER_CHECK_REQUIRE_NETWORK_ISOLATION is set)"
            ),
        )
    else:
        try:
            code, message = _verdict(args)
        except Exception as error:
            code, message = _unexpected(error, args.memory_bytes)
    Path(args.result).write_text(json.dumps({"code": code, "message": message, "network_isolated": isolated}))
    return 0 if code == "ok" else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
