"""RQ's internals have one home, `fgs_common.rq_adapter`, written against one RQ release: the installed rq must be
that release, and no other module of ours reaches into RQ's private methods, fields or Redis structures."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import redis
import rq

from fgs_common import rq_adapter

REPO = Path(__file__).resolve().parents[1]
# What only the adapter may name: RQ's private methods and fields, its modules of internals, its own Redis keys.
RQ_INTERNALS = re.compile(
    r"\._finalize_|\._job\b|_ordered_queues|\._stop_requested|\.executions\b|intermediate_queue|repeats_left|"
    r"redis_queue_namespace_prefix|Job\.key_for|from rq\.(worker|executions|registry|utils|defaults) import|"
    r"dequeue_job_and_maintain_ttl|prepare_job_execution|get_heartbeat_ttl|RQ_KEY_PREFIX\"\]|"
    # RQ's worker methods: overridden, or called out of RQ's own order, only in the adapter (its hooks are ours)
    r"def (execute_job|run_maintenance_tasks|check_for_suspension|heartbeat|teardown|perform_job|handle_job_\w+|"
    r"reorder_queues|work|request_stop|request_force_stop|bootstrap|register_birth|register_death|subscribe|"
    r"unsubscribe)\(|_pubsub_exception_handler|\.pubsub_thread\b|"
    r"should_run_maintenance_tasks|\.run_maintenance_tasks\(|super\(\)\.(execute_job|heartbeat|teardown)\("
)


def test_the_installed_rq_is_the_one_the_adapter_was_written_for():
    assert rq.__version__ == rq_adapter.WRITTEN_FOR_RQ, (
        f"rq {rq.__version__} is installed, but fgs_common/rq_adapter.py was written against rq "
        f"{rq_adapter.WRITTEN_FOR_RQ}: it overrides RQ's private methods and writes RQ's own Redis structures, "
        f"which any release may change. Install rq=={rq_adapter.WRITTEN_FOR_RQ}, or read the new release's worker, "
        "job, execution and registry code against the adapter, rerun the worker and queue tests, and move "
        "WRITTEN_FOR_RQ."
    )


def test_no_other_module_of_ours_touches_rq_internals():
    offenders = []
    for folder in ("common", "service", "worker", "classifier"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == Path(rq_adapter.__file__).resolve():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if RQ_INTERNALS.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == [], "RQ internals outside fgs_common/rq_adapter.py:\n" + "\n".join(offenders)


def test_the_internals_check_finds_what_it_looks_for():
    """The pattern can fail: lines as they stood before the adapter existed are caught."""
    before = [
        "            self.worker._finalize_success(job, queue, execution, companion.result)",
        "        rq_job.repeats_left, rq_job.repeat_intervals = 1, [0]",
        "                pipe.llen(Queue.redis_queue_namespace_prefix + name)",
        "from rq.worker import SimpleWorker, WorkerStatus",
        "    def run_maintenance_tasks(self):",  # fgs_worker.main overrode RQ's worker methods until 6 Dec 2026
        "            if self.should_run_maintenance_tasks:",
        "            super().execute_job(job, queue)",
        "    def subscribe(self) -> None:",  # RqWorker's since 6 Dec 2026: the command listener's wait
        "            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler",
    ]
    assert all(RQ_INTERNALS.search(line) for line in before)


def test_a_workers_command_listener_stops_within_seconds(redis_server):
    """RQ 3.0 listens for commands a minute per wait and redis-py 8's stop() waits for the listener: a worker's
    shutdown once hung a minute in RQ's `unsubscribe` (`RqWorker.subscribe`). Stopped with no message to wake it,
    ours ends within a few of its polls."""
    connection = redis.Redis.from_url(redis_server)
    queue = rq.Queue(f"adapter-test-{uuid.uuid4().hex[:8]}", connection=connection)
    worker = rq_adapter.RqWorker([queue], f"adapter-{uuid.uuid4().hex[:8]}", connection, 60, 60)
    worker.subscribe()
    try:
        time.sleep(0.5)  # the listener is in its wait
        started = time.monotonic()
        stopper = threading.Thread(target=worker.pubsub_thread.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive(), "the listener still runs 10 s after it was asked to stop"
        assert time.monotonic() - started <= 3 * rq_adapter.PUBSUB_POLL_S
    finally:
        worker.pubsub.close()
