"""Soak: steady load for 30 minutes while faults are injected, then the audit (bench/stack_under_load.py):
- a worker SIGKILLed every 5 minutes (restarted, as `fgs up` does);
- once, a worker SIGSTOPped past the abandon time (FGS_ABANDONED_AFTER_S) and then SIGCONTed: its job is taken
  over by the other worker and the resumed one must not write to it;
- once, Redis restarted (SIGTERM, 2 s down, started again on its AOF): 503s are allowed inside that window only.
Writes its report to bench/RESULTS.md under "## bench/soak.py".

    .venv/bin/python bench/soak.py                     # the issue's run: 30 minutes
    .venv/bin/python bench/soak.py --minutes 6         # shortened: every fault once, spaced to fit
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import stack_under_load as under_load  # noqa: E402
from load import JOB_SIZE, write_results  # noqa: E402

ABANDONED_AFTER_S = 10


def inject_faults(
    stack: under_load.LocalStack, minutes: float, stop: threading.Event, events: list, outages: list
) -> None:
    """The fault schedule, scaled to the run: kills every minutes/6, the stop at 1/2, the Redis restart at 2/3."""
    total = minutes * 60
    began = time.time()
    kills = [total * k / 6 for k in range(1, 6)]
    plan = sorted([(t, "kill") for t in kills] + [(total * 0.5 - 2, "stop"), (total * 2 / 3 + 3, "redis")])
    victim = 0
    for at, fault in plan:
        while time.time() - began < at:
            if stop.wait(0.5):
                return
            stack.restart_dead_workers()
        moment = round(time.time() - began, 1)
        if fault == "kill":
            stack.kill_worker(victim % len(stack.workers))
            events.append(f"{moment} s: SIGKILL worker {victim % len(stack.workers)}")
            victim += 1
        elif fault == "stop":
            import signal

            process = stack.workers[1 % len(stack.workers)]
            process.send_signal(signal.SIGSTOP)
            time.sleep(ABANDONED_AFTER_S * 2)
            process.send_signal(signal.SIGCONT)
            events.append(f"{moment} s: SIGSTOP worker 1 for {ABANDONED_AFTER_S * 2} s, then SIGCONT")
        else:
            outages.append(stack.restart_redis())
            events.append(f"{moment} s: Redis restarted ({outages[-1][1] - outages[-1][0]:.1f} s down)")
    while not stop.wait(0.5):
        stack.restart_dead_workers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=20, help="steady load: each client has one job in flight")
    parser.add_argument("--drain-s", type=float, default=600)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    where = under_load.machine()
    stack = under_load.LocalStack(
        workers=2,
        env={"FGS_ABANDONED_AFTER_S": str(ABANDONED_AFTER_S), "FGS_JOB_RETRIES": "5", "FGS_RETRY_BACKOFF_S": "[1]"},
    )
    stop, events, outages = threading.Event(), [], []
    faults = threading.Thread(target=inject_faults, args=(stack, args.minutes, stop, events, outages), daemon=True)
    findings: dict | None = None
    try:
        faults.start()
        began = time.time()
        log = under_load.run_clients(stack, args.clients, args.minutes * 60, JOB_SIZE)
        load_s = time.time() - began
        drained = under_load.wait_drained(stack, log, args.drain_s)
        stop.set()
        faults.join(timeout=120)
        findings = under_load.audit(stack, log, outages)
        if not drained:
            findings.setdefault("not drained", []).append(f"after {args.drain_s} s")
        numbers = under_load.summary(log, load_s) | {
            "images_generated": under_load.images_generated(stack),
            "worker_restarts": stack.worker_restarts,
        }
    finally:
        stop.set()
        # an audit with findings keeps the API and worker logs, to find out why
        stack.close(keep_logs=None if findings == {} else Path("out/soak-logs"))
    report = {
        "minutes": args.minutes,
        "clients": args.clients,
        "faults": events,
        **numbers,
        "audit": findings or "clean",
    }
    print(json.dumps(report, indent=2))
    write_results(args.results, "bench/soak.py", where, " ".join(sys.argv[1:]) or "(defaults)", report)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
