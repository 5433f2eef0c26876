"""All configuration of fgs, in one pydantic-settings object read once (environment prefix FGS_).

Each setting's docstring is its description (pydantic's `use_attribute_docstrings`): it says what the setting does
and where its default comes from.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fgs_common.classifier_archive import DEFAULT_MAX_UNPACKED_BYTES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FGS_", extra="ignore", use_attribute_docstrings=True)

    redis_url: str | None = None
    """redis://host:port/db; unset: `fgs up` starts a local one"""
    default_redis_url: str = "redis://127.0.0.1:6379/0"
    """where `fgs up` looks for a Redis when FGS_REDIS_URL is unset"""
    redis_prefix: str = "fgs"
    """key prefix for everything fgs stores in Redis, RQ's queues and jobs too (`{prefix}:rq`, job_records.py)"""
    data_dir: Path = Path(".fgs")
    """the artifact store (images, classifiers); a relative path is taken from the directory fgs starts in"""
    model: str = "fgs-digits"
    """'fgs-digits' or 'fgs-digits-contexts' (embedded), 'tiny' (random weights) or a diffusers directory"""
    api_keys_file: Path | None = None
    api_keys: str | None = None
    """the keys file's JSON inline (for containers without a mounted file)"""
    dev_api_key: str | None = None
    dev_tenant: str = "dev"
    device: str | None = None
    """torch device for the worker; default cuda if present else cpu"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the worker's model (UNet, VAE, text and image encoders), on any device. auto: float16 on CUDA
    (diffusers' recipe for SD 2.1 unCLIP on GPUs, fgs's behaviour before this setting), float32 elsewhere. The
    team's classifier always runs in float32, its archive's dtype; the few sums the guided loop needs exact stay in
    float32 (fgs_worker.guidance.precision). bfloat16 on a CPU: bench/RESULTS.md"""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_queued_images_per_tenant: int = 2_000_000
    job_timeout_s: int = 3600
    job_retries: int = 2
    max_batch_images: int = Field(default=8, ge=1)
    """most images in one sampler call, of one job or of several (FGS_BATCH_ACROSS_JOBS). Our measurement
    (bench/RESULTS.md, bench/sampler.py, 27 Nov): on 2 CPU cores unguided throughput at B = 8 is 2.7x that at B = 1
    and only 6% above B = 4, so 8 takes nearly all the gain while a step's memory and deadline
    (FGS_STEP_DEADLINE_*) stay small; a GPU gains from more (bench/gpu.py)"""
    chunk_target_s: float = Field(default=10.0, gt=0)
    """how long one sampler call of a lone job (a chunk of its images) should take. The worker starts at
    FGS_MAX_BATCH_IMAGES images, halves a chunk that took longer, doubles one that took under half
    (fgs_worker.runtime.record_chunk), and between chunks yields to another tenant's queued job (issue 19: a
    1-image job waited 90.9 s behind one 64-image job). So a tenant waits about this long behind another's large
    job. 10 s: a batch of 8 at 30 steps of fgs-digits on 2 CPU cores (0.3-0.6 s per step at B = 8,
    bench/RESULTS.md) takes 9-18 s, so CPU chunks settle at 4-8 images, where per-image throughput differs by 6 %
    (bench/sampler.py, bench/RESULTS.md), while the wait stays about 10 s instead of the whole job"""
    batch_across_jobs: bool = True
    """a worker taking a job of fewer than FGS_MAX_BATCH_IMAGES images also claims queued jobs that can share its
    sampler call (fgs_worker.shared_batch); off: one job per call, as before issue 15. On by default: our
    bench/batching.py measures the gain (bench/RESULTS.md), tests/test_shared_batch*.py the faults"""
    classifier_cache_size: int = 8
    heartbeat_s: float = 5.0
    abandoned_after_s: int = Field(default=120, ge=3)
    """a running job whose worker has not heartbeated for this long is retried on another worker (keep it well
    above the longest denoising step; workers check this often)"""

    # Watchdog (fgs_worker.watchdog): a step that overruns its deadline ends the worker process, the job is retried
    # (FGS_JOB_RETRIES) and then failed. Deadline of one denoising step (classifier forward included):
    #   step_deadline_base_s + step_deadline_s_per_megapixel * images in the batch * megapixels per image
    step_deadline_base_s: float = Field(default=60.0, gt=0)
    """fixed part of a step's deadline; ~100x a fgs-digits CPU step at batch 8 (0.3-0.6 s on 2 shared cores,
    bench/RESULTS.md), so only a stuck step reaches it"""
    step_deadline_s_per_megapixel: float = Field(default=60.0, ge=0)
    """deadline added per megapixel in the batch; SD 2.1 unCLIP at 768x768 (0.59 MP) runs ~2 s per image-step on
    a CPU-class device and ~0.05 s on an A100, so 35 s per image is ample everywhere"""
    job_setup_deadline_s: float = Field(default=300.0, gt=0)
    """extra time before the first step (conditioning images, classifier load and check); a 512 MB classifier
    loads in well under a minute from a network volume"""
    cancel_grace_s: float = Field(default=10.0, gt=0)
    """a cancel not honoured at a step boundary within this long ends the worker process (the job is then
    canceled by the watchdog)"""
    watchdog_poll_s: float = Field(default=0.5, gt=0)
    """how often the watchdog thread looks at the clock"""
    max_pixels_per_image: int | None = Field(default=None, ge=64)
    """largest width*height one image may have on this deployment's model; default: the model's own (published by
    the workers, fgs_worker.model_loading.max_pixels_per_image)"""

    # Supervisor (`fgs up`)
    restart_backoff_s: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0])
    """waits before restarting a child that exited, by consecutive failure; a child that ran a minute resets it"""
    stop_grace_s: float = Field(default=30.0, gt=0)
    """how long `fgs up` waits after SIGTERM before SIGKILL (Kubernetes' default termination grace)"""

    # Service
    http_header_timeout_s: float = Field(default=20.0, gt=0)
    """a connection must send a whole request head within this long (Apache mod_reqtimeout's default,
    header=20-40); slowloris"""
    http_body_timeout_s: float = Field(default=20.0, gt=0)
    """a request body's grace: its first bytes must come within this long (Apache mod_reqtimeout's default,
    body=20); afterwards FGS_HTTP_BODY_MIN_RATE applies. A body is read only once its API key is known
    (fgs_service.request_gate)"""
    http_body_min_rate: int = Field(default=500, ge=1)
    """bytes per second a request body must keep up after the grace (mod_reqtimeout's default, MinRate=500): by t
    seconds in, 500 * (t - FGS_HTTP_BODY_TIMEOUT_S) bytes; slower is a 408. A 4 GiB upload needs 500 B/s"""
    http_keep_alive_s: int = Field(default=5, ge=1)
    """an idle keep-alive connection is closed after this long (uvicorn's default)"""
    redis_max_connections: int = Field(default=100, ge=1)
    """connections per Redis pool of the API (redis-py's default pool size); more requests wait"""
    redis_pool_timeout_s: float = Field(default=10.0, gt=0)
    """how long a request waits for a free Redis connection before its 503"""
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = Path(".fgs/state")
    """where `fgs up` keeps its local redis-server data"""
    max_classifier_bytes: int = 512 * 1024 * 1024
    max_hardness_stats_bytes: int = 4 * 1024**3
    """largest hardness statistics file an upload may carry; streamed to disk, never held in memory. Default: 4x
    ImageNet-LT's statistics at k = 2,048 (0.95 GB, bench/hardness_scale.py). Starlette spools uploaded parts to
    the system temp dir (TMPDIR), which needs that much room too"""
    classifier_check_timeout_s: float = 120.0
    # The classifier check's sandbox (fgs_common.classifier_sandbox). Measured with torch 2.13 CPU, one thread, on
    # the 10-class SmallCNN: a TorchScript check peaks at 0.6 GiB of address space (VmPeak; 0.3 GiB resident), a
    # .pt2 check at 0.7 GiB (0.4 GiB), almost all of it torch itself. An archive's weights come on top, about
    # twice (a .pt2 is copied once to drop its sample inputs): 4 GiB holds a 512 MiB archive
    # (FGS_MAX_CLASSIFIER_BYTES) with room to run it on a batch of 2.
    classifier_check_memory_bytes: int = Field(default=4 * 1024**3, ge=512 * 1024**2)
    """address-space limit of one classifier check (RLIMIT_AS)"""
    # The same checks take 1.4 s (TorchScript) and 2.7 s (.pt2) of CPU, mostly importing torch and loading; 60 s
    # leaves a large classifier room while a spinning one ends well before the 120 s wall-clock limit above.
    classifier_check_cpu_s: int = Field(default=60, ge=5)
    """CPU-time limit of one classifier check (RLIMIT_CPU)"""
    # Each check is one CPU-bound process of up to classifier_check_memory_bytes: two at once keep an API host of
    # 4 cores and 16 GiB responsive while a third upload waits.
    classifier_checks_at_once: int = Field(default=2, ge=1)
    """classifier checks run at once; 429 beyond"""
    classifier_check_retry_after_s: int = Field(default=10, ge=1)
    """Retry-After of that 429"""
    classifier_checks_per_tenant: int = Field(default=1, ge=1)
    """checks one tenant may run (or wait for) at once, of FGS_CLASSIFIER_CHECKS_AT_ONCE: its next upload is its
    own 429. An upload within its tenant's share waits for a free slot (at most FGS_CLASSIFIER_CHECK_TIMEOUT_S,
    the longest a check holds one) instead of a 429: one tenant's slow checks never refuse another's upload
    (issue 19: two slow uploads of one tenant gave every other tenant 429 for 100 s)"""
    classifier_check_require_network_isolation: bool = False
    """refuse uploads (503) where the kernel gives the check no network namespace of its own; off: the check then
    runs with the host's network and a warning is logged"""
    max_classifier_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
    """total unpacked size of a classifier archive (zip bombs)"""
    # At run time a worker runs each loaded classifier in a confined child process (fgs_worker.confined_classifier)
    # with the check's confinement; only its memory limit and its per-call deadline are its own.
    classifier_run_memory_bytes: int = Field(default=3 * 1024**3, ge=512 * 1024**2)
    """address-space limit (RLIMIT_AS) of a classifier's run-time process. Below the check's 4 GiB because it
    must bound a classifier that allocates only at batch sizes the check never tries (issue 19: 3 GiB at other
    batch sizes took a worker to 3.6 GiB). Measured (bench/confined_classifier.py, bench/RESULTS.md, 6 Dec): the
    process of a 10-class SmallCNN on fgs-digits peaks at 0.61 GiB of address space (torch itself) at batch 8
    with its backward; 3 GiB leaves about 2.4 GiB for a larger classifier's weights and activations"""
    classifier_call_timeout_s: float = Field(default=30.0, gt=0)
    """deadline of one call into a classifier's run-time process (forward, criterion and backward of a batch);
    past it the process is killed and the job fails with `classifier_timeout`. Half of FGS_STEP_DEADLINE_BASE_S,
    so a hanging classifier fails its job before the watchdog would end the whole worker; a fgs-digits call at
    batch 8 takes 0.1 s on 2 loaded CPU cores (bench/RESULTS.md)"""
    classifier_check: bool = True
    """run uploaded classifiers once in a subprocess (needs the worker extra) before accepting them"""
    unavailable_retry_after_s: int = Field(default=5, ge=1)
    """Retry-After of a 503 while Redis is unavailable (a Redis restart replays its AOF in seconds)"""
    idempotency_ttl_s: int = 24 * 3600
    enqueue_reservation_ttl_s: int = Field(default=60, ge=1)
    """a quota or Idempotency-Key reservation whose enqueue never completed (API killed) expires after this long;
    a 10,000-job batch enqueues in ~2 s (bench/api.py)"""
    max_json_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """largest JSON request body (POST /v1/generate, /v1/batches); a 10,000-job batch with one conditioning image
    per job is ~3 MB"""
    job_record_ttl_s: int = 30 * 24 * 3600
    retry_backoff_s: list[int] = Field(default_factory=lambda: [5, 30])
    worker_queue_poll_s: int = Field(default=1, ge=1)
    """how often an idle worker looks for new tenant queues"""
    sse_poll_s: float = 0.25
    max_sse_streams_per_tenant: int = Field(default=64, ge=1)
    """progress streams (GET /v1/jobs/{job_id}/events) one tenant may hold open on one API process; 429 beyond. Above
    what fgs's own clients open (the page 3, bench/load.py 25 per tenant); 1,500 streams of one tenant raised
    another's median latency from 7 ms to 1.3 s (issue 19), so 64 bound that to a few tens of ms"""
    sse_retry_after_s: int = Field(default=5, ge=1)
    """Retry-After of that 429 (a stream ends with its job, or when its client goes)"""
    gallery_cache_images: int = Field(default=50_000, ge=0)
    """images of final jobs whose parsed gallery items one API process keeps (least recently used dropped): five
    tenants' 10,000-image galleries. A gallery of cached jobs costs a filter and a sort (bench/gallery.py)"""
    max_view_requests_per_tenant: int = Field(default=2, ge=1)
    """gallery and compare requests (GET /v1/views/gallery, /compare) one tenant may have in progress on one API
    process; 429 with Retry-After 1 beyond. The page sends one at a time; four at once of one tenant raised
    another's median latency to 521 ms (issue 19)"""
    worker_name: str | None = None
    """name of this worker in Redis and metrics; default host-random"""

    @field_validator("data_dir", "state_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # Resolved once, where fgs starts: the classifier check runs in a subprocess whose working directory is its
        # scratch folder, so a relative data directory (the default) named nothing there and every upload failed.
        return path.expanduser().resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
