"""Prometheus metrics, read from Redis at scrape time (workers record theirs there; see fgs_common.telemetry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fgs_common import telemetry
from fgs_service.job_queue import JobQueue


class RedisMetricsCollector:
    """Queue depths, job counters, histograms and worker gauges, all prefixed `fgs_`."""

    def __init__(self, queue: JobQueue):
        self.queue = queue

    def collect(self):
        redis, prefix = self.queue.redis, self.queue.keys.prefix
        depth = GaugeMetricFamily("fgs_queue_depth", "Jobs waiting in each tenant's queue", labels=["tenant"])
        queued_images = GaugeMetricFamily(
            "fgs_queued_images", "Images of queued and running jobs per tenant", labels=["tenant"]
        )
        for tenant, count in self.queue.queue_depths().items():
            depth.add_metric([tenant], count)
            queued_images.add_metric([tenant], int(redis.get(self.queue.keys.queued_images(tenant)) or 0))
        yield depth
        yield queued_images

        families = {
            name: CounterMetricFamily(f"fgs_{name}", help_text, labels=list(labels))
            for name, (help_text, labels) in telemetry.COUNTERS.items()
        }
        values = redis.hgetall(telemetry.counter_key(prefix))
        for name, (_, labels) in telemetry.COUNTERS.items():
            if not labels:  # unlabelled counters exist from the start, at 0
                values.setdefault(name, "0")
        for field, value in sorted(values.items()):
            name, labels = telemetry.parse_counter_field(field)
            if name in families:
                families[name].add_metric([labels[k] for k in telemetry.COUNTERS[name][1]], float(value))
        yield from families.values()

        for name, (help_text, bounds) in telemetry.HISTOGRAMS.items():
            raw = redis.hgetall(telemetry.histogram_key(prefix, name))
            cumulative, buckets = 0, []
            for index, bound in enumerate(list(bounds) + [float("inf")]):
                cumulative += int(raw.get(str(index), 0))
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            family = HistogramMetricFamily(f"fgs_{name}", help_text)
            family.add_metric([], buckets, sum_value=float(raw.get("sum", 0)))
            yield family

        alive = GaugeMetricFamily("fgs_workers_alive", "Workers whose heartbeat has not expired")
        last_beat = GaugeMetricFamily(
            "fgs_worker_last_heartbeat_timestamp_seconds",
            "Unix time of each worker's last heartbeat",
            labels=["worker"],
        )
        gpu = GaugeMetricFamily(
            "fgs_worker_gpu_memory_allocated_bytes",
            "GPU memory held by each worker's torch allocator",
            labels=["worker"],
        )
        names = [
            key.rsplit(":", 1)[1] for key in redis.scan_iter(match=self.queue.keys.worker_alive_pattern(), count=1000)
        ]
        alive.add_metric([], len(names))
        for worker in sorted(names):
            gauges = redis.hgetall(telemetry.worker_gauge_key(prefix, worker))
            if "last_heartbeat" in gauges:
                last_beat.add_metric([worker], float(gauges["last_heartbeat"]))
            if "gpu_memory_allocated_bytes" in gauges:
                gpu.add_metric([worker], float(gauges["gpu_memory_allocated_bytes"]))
        yield alive
        yield last_beat
        yield gpu


def build_registry(queue: JobQueue) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisMetricsCollector(queue))
    return registry
