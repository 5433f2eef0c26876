"""Load: 200 concurrent clients for 2 minutes of mixed submit / status / SSE / download against the API and 2
workers on the tiny model, all on loopback; then the audit (bench/stack_under_load.py) and a line in
bench/RESULTS.md under "## bench/load.py".

    .venv/bin/python bench/load.py                      # the issue's run: 200 clients, 120 s
    .venv/bin/python bench/load.py --clients 20 --seconds 20   # a quick look

Bounded: the clients stop submitting after --seconds, then follow their last job; the drain waits at most
--drain-s; every process is stopped at the end. Exit status 1 when the audit finds anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stack_under_load import (  # noqa: E402
    LocalStack,
    audit,
    images_generated,
    machine,
    run_clients,
    summary,
    wait_drained,
)

# Small jobs, so that 2 CPU workers keep up with 200 clients: 2 DDIM steps at the tiny model's 64x64.
JOB_SIZE = {"steps": 2, "guidance_every": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--drain-s", type=float, default=600)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    where = machine()
    stack = LocalStack(workers=args.workers)
    try:
        began = time.time()
        log = run_clients(stack, args.clients, args.seconds, JOB_SIZE)
        load_s = time.time() - began
        drained = wait_drained(stack, log, args.drain_s)
        findings = audit(stack, log)
        if not drained:
            findings.setdefault("not drained", []).append(f"after {args.drain_s} s")
        numbers = summary(log, load_s) | {
            "images_generated": images_generated(stack),
            "worker_restarts": stack.worker_restarts,
        }
    finally:
        stack.close()
    report = {
        "clients": args.clients,
        "seconds": args.seconds,
        "workers": args.workers,
        **numbers,
        "audit": findings or "clean",
    }
    print(json.dumps(report, indent=2))
    write_results(args.results, "bench/load.py", where, " ".join(sys.argv[1:]) or "(defaults)", report)
    return 1 if findings else 0


def write_results(path: Path, section: str, where: str, arguments: str, report: dict) -> None:
    """Replace (or append) this script's section of RESULTS.md."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = (
        f"## {section}\n\n{date.today().isoformat()}, {where}. Arguments: `{arguments}`.\n\n"
        f"```json\n{json.dumps(report, indent=2)}\n```\n"
    )
    head, marker, rest = text.partition(f"## {section}\n")
    if marker:
        following = rest.find("\n## ")
        text = head + body + (rest[following + 1 :] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
