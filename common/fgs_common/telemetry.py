"""Metrics that workers and the API record into Redis and the API's /metrics reads back.

Workers run on other machines, so their counters and histograms live in Redis, not in process memory:
any API replica then serves the same numbers. Only the names, label sets and bucket bounds are defined
here; `fgs_service.metrics` turns them into Prometheus families. Functions take a redis client or
pipeline (duck-typed, so this module imports neither redis nor torch).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# name -> (help, bucket upper bounds); +Inf is implied.
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "queue_wait_seconds": (
        "Seconds a job waited in its queue before a worker took it",
        (0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200, 36000),
    ),
    "sampling_seconds": ("Seconds a worker spent sampling one job", (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200)),
    "end_to_end_seconds": (
        "Seconds from enqueue to the job's final state",
        (0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200, 36000),
    ),
    "batch_size": ("Images per sampler call", (1, 2, 4, 8, 16, 32, 64)),
}

# name -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jobs": ("Jobs that entered each state", ("tenant", "criterion", "status")),
    "images_generated": ("Images written to the artifact store", ("tenant",)),
    "classifier_cache_hits": ("Resident-classifier cache hits", ()),
    "classifier_cache_misses": ("Resident-classifier cache misses (classifier loaded)", ()),
    "classifier_cache_evictions": ("Resident classifiers evicted from the cache", ()),
    "worker_heartbeats": ("Heartbeats sent by workers", ()),
}


def counter_key(prefix: str) -> str:
    return f"{prefix}:metrics:counters"


def histogram_key(prefix: str, name: str) -> str:
    return f"{prefix}:metrics:hist:{name}"


def worker_gauge_key(prefix: str, worker: str) -> str:
    return f"{prefix}:metrics:worker:{worker}"


def counter_field(name: str, labels: dict[str, str]) -> str:
    """Hash field for one counter series: name|k=v|k=v in the declared label order."""
    label_names = COUNTERS[name][1]
    return "|".join([name] + [f"{k}={labels[k]}" for k in label_names])


def parse_counter_field(field: str) -> tuple[str, dict[str, str]]:
    name, *pairs = field.split("|")
    return name, dict(pair.split("=", 1) for pair in pairs)


def incr_counter(redis: Any, prefix: str, name: str, amount: float = 1, **labels: str) -> None:
    redis.hincrbyfloat(counter_key(prefix), counter_field(name, labels), amount)


def observe(redis: Any, prefix: str, name: str, value: float) -> None:
    """Add one observation to histogram `name` (bucket counts are stored per bucket, made cumulative on read)."""
    bounds = HISTOGRAMS[name][1]
    index = bisect_left(bounds, value)  # first bound >= value; len(bounds) means +Inf
    key = histogram_key(prefix, name)
    redis.hincrby(key, str(index), 1)
    redis.hincrbyfloat(key, "sum", value)
    redis.hincrby(key, "count", 1)
