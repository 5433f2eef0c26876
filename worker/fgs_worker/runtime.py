"""What a worker process keeps resident between jobs, and how a job reaches it.

`WorkerRuntime.load` is the one-time setup (cog's `setup()`): the unCLIP pipeline, the sampler, the classifier
LRU and the Redis clients. The worker sets it as the current runtime around each job (a context variable, not a
module-level global), and `fgs_worker.jobs` reads it with `current_runtime()`. What the job code needs from the
RQ worker itself is `WorkerHost`: the worker sets itself as the current host beside the runtime
(`running_jobs`), and the job code reads it with `current_host()`; outside a job the host is a `DetachedHost`.
"""

from __future__ import annotations

import contextvars
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
import torch

from fgs_classifier.registry import ClassifierRegistry
from fgs_common import telemetry
from fgs_common.artifact_store import ArtifactStore
from fgs_common.job_records import JobRecords, Keys
from fgs_common.settings import Settings
from fgs_common.wire import GenerationParams, ModelInfo
from fgs_worker.guidance.guided_ddim import GuidedDDIMSampler
from fgs_worker.model_loading import default_device, load_pipeline, model_dtype, read_model_card
from fgs_worker.shared_batch import ExcInfo
from fgs_worker.watchdog import JobWatchdog, NullWatchdog

# Default largest image, in multiples of the model's native pixel count: 4 = twice the native side. unCLIP and
# SD 2.x UNets were trained at their native size and their attention cost grows with the square of the pixels;
# 2048x2048 on the 32x32 embedded model (4,096x its pixels) sat in its first step past the heartbeat (issue 10).
MAX_PIXELS_FACTOR = 4

_CURRENT: contextvars.ContextVar[WorkerRuntime] = contextvars.ContextVar("fgs_worker_runtime")
_HOST: contextvars.ContextVar[WorkerHost] = contextvars.ContextVar("fgs_worker_host")


class WorkerHost(Protocol):
    """What the job code needs from the RQ worker that runs it (fgs_worker.main.FgsWorker)."""

    watchdog: JobWatchdog | NullWatchdog

    def rq_heartbeat(self) -> None:
        """Keep RQ's view of the worker and of the executions it runs alive (called on every beat inside a job;
        between jobs RQ's own worker heartbeat runs in the idle loop, fgs_common.rq_adapter)."""

    def expire_executions(self) -> None:
        """Hand the running jobs' RQ executions to the abandon sweep (the watchdog, before it ends the process)."""

    def others_waiting(self, queue_name: str) -> bool:
        """Whether a tenant queue other than `queue_name` holds a job (a long job then yields its worker)."""

    def claim_companions(self, origin: str, batch_key: str, images: int) -> list[tuple[str, int]]:
        """Claim queued jobs that can share the running job's sampler call (fgs_worker.shared_batch): (job id, RQ
        retries left) each."""

    def finish_companion(self, job_id: str, result: Any = None, exc_info: ExcInfo | None = None) -> None:
        """How a claimed companion ended: a result, or the exception RQ retries or files it failed with."""


class DetachedHost:
    """The host outside a job (a worker's idle beats, or a runtime no RQ worker runs): no executions to keep alive,
    no watchdog, no companions, nobody waiting."""

    def __init__(self) -> None:
        self.watchdog = NullWatchdog()

    def rq_heartbeat(self) -> None:
        pass

    def expire_executions(self) -> None:
        pass

    def others_waiting(self, queue_name: str) -> bool:
        return False

    def claim_companions(self, origin: str, batch_key: str, images: int) -> list[tuple[str, int]]:
        return []

    def finish_companion(self, job_id: str, result: Any = None, exc_info: ExcInfo | None = None) -> None:
        raise RuntimeError(f"job {job_id} is no companion: a detached runtime claims none")


@dataclass
class WorkerRuntime:
    settings: Settings
    name: str
    redis: Any  # decode_responses=True: job records, flags, metrics
    rq_redis: Any  # bytes: RQ
    store: ArtifactStore
    records: JobRecords
    keys: Keys
    sampler: GuidedDDIMSampler
    classifiers: ClassifierRegistry
    device: torch.device
    model_id: str
    model_card: dict = field(default_factory=dict)  # model_card.json beside the weights: class names, prompt form
    last_beat: float = field(default=0.0)
    current_jobs: list[tuple[str, str]] = field(default_factory=list)  # (job id, owner token) of the batch running
    chunk_work: float | None = None  # image-steps x megapixels one chunk may hold (chunk_images, record_chunk)

    @classmethod
    def load(cls, settings: Settings, name: str | None = None) -> WorkerRuntime:
        """Load the pipeline once and connect; takes seconds to minutes (model size)."""
        if not settings.redis_url:
            raise ValueError("FGS_REDIS_URL is not set")
        name = name or settings.worker_name or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        device = torch.device(settings.device) if settings.device else default_device()
        decoded = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        prefix = settings.redis_prefix

        def on_cache_event(event: str) -> None:
            name_of = {
                "hit": "classifier_cache_hits",
                "miss": "classifier_cache_misses",
                "eviction": "classifier_cache_evictions",
            }
            telemetry.incr_counter(decoded, prefix, name_of[event])

        pipeline = load_pipeline(settings.model, device=device, dtype=model_dtype(settings.dtype, device))
        return cls(
            settings=settings,
            name=name,
            redis=decoded,
            rq_redis=redis.Redis.from_url(settings.redis_url),
            store=ArtifactStore(settings.data_dir),
            records=JobRecords(decoded, prefix, settings.job_record_ttl_s),
            keys=Keys(prefix),
            sampler=GuidedDDIMSampler(pipeline),
            classifiers=ClassifierRegistry(settings.classifier_cache_size, on_event=on_cache_event),
            device=device,
            model_id=settings.model,
            model_card=read_model_card(settings.model),
        )

    def beat(self, force: bool = False) -> None:
        """Mark this worker alive (readiness, metrics); at most once per heartbeat_s unless forced."""
        now = time.time()
        if not force and now - self.last_beat < self.settings.heartbeat_s:
            return
        self.last_beat = now
        ttl = self.settings.abandoned_after_s  # the same TTL as the job's RQ heartbeat (FgsWorker.rq_heartbeat)
        gauges: dict[str, float] = {"last_heartbeat": now}
        if self.device.type == "cuda":
            gauges["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker_alive(self.name), now, ex=ttl)
            gauge_key = telemetry.worker_gauge_key(self.keys.prefix, self.name)
            pipe.hset(gauge_key, mapping=gauges)
            pipe.expire(gauge_key, ttl)
            telemetry.incr_counter(pipe, self.keys.prefix, "worker_heartbeats")
            pipe.execute()
        current_host().rq_heartbeat()

    def chunk_images(self, params: GenerationParams) -> int:
        """Images in the next sampler call of a job, between 1 and FGS_MAX_BATCH_IMAGES: as many as the work a
        chunk may hold (`record_chunk`) allows at this job's steps and size; the most before any chunk was timed."""
        if self.chunk_work is None:
            return self.settings.max_batch_images
        per_image = params.steps * self._megapixels(params)
        return max(1, min(self.settings.max_batch_images, int(self.chunk_work / per_image)))

    def record_chunk(self, images: int, params: GenerationParams, seconds: float) -> None:
        """Adjust the work a chunk may hold from one sampler call's time: doubled while calls take under half of
        FGS_CHUNK_TARGET_S, halved when one takes longer. Doubling and halving, not a speed per image: a call has
        a fixed cost (prompts, embeddings, the records) that a per-image speed would charge to each image."""
        work = images * params.steps * self._megapixels(params)
        target = self.settings.chunk_target_s
        if seconds > target:
            self.chunk_work = work / 2
        elif seconds < target / 2 and images >= self.chunk_images(params):  # a full chunk, and quick
            self.chunk_work = 2 * work

    def _megapixels(self, params: GenerationParams) -> float:
        width, height = self.sampler.image_size(params)
        return width * height / 1e6

    def model_info(self) -> ModelInfo:
        width, height = self.sampler.image_size(GenerationParams())
        limit = self.settings.max_pixels_per_image or MAX_PIXELS_FACTOR * width * height
        return ModelInfo(
            model=self.model_id,
            native_width=width,
            native_height=height,
            max_pixels_per_image=limit,
            class_names=self.model_card.get("class_names"),
            prompt_template=self.model_card.get("prompt_template"),
            contexts=self.model_card.get("contexts"),
            model_card=self.model_card.get("card"),
        )

    def publish_model_info(self) -> None:
        """Tell the API what the resident model accepts (it refuses bigger images with a 422)."""
        self.redis.set(self.keys.model_info(), self.model_info().model_dump_json())

    def retire(self) -> None:
        self.classifiers.close()  # their processes would die with this one anyway (PR_SET_PDEATHSIG)
        self.redis.delete(self.keys.worker_alive(self.name), telemetry.worker_gauge_key(self.keys.prefix, self.name))


def current_runtime() -> WorkerRuntime:
    try:
        return _CURRENT.get()
    except LookupError:
        raise RuntimeError(
            "fgs_worker.jobs functions run inside an fgs worker (fgs worker), which sets the runtime"
        ) from None


_DETACHED = DetachedHost()


def current_host() -> WorkerHost:
    """The RQ worker running the current job; a `DetachedHost` outside one."""
    return _HOST.get(_DETACHED)


@contextmanager
def running_jobs(runtime: WorkerRuntime, host: WorkerHost) -> Iterator[None]:
    """Inside: `current_runtime()` is `runtime` and `current_host()` is `host` (the worker, around each job)."""
    runtime_token, host_token = _CURRENT.set(runtime), _HOST.set(host)
    try:
        yield
    finally:
        _HOST.reset(host_token)
        _CURRENT.reset(runtime_token)
