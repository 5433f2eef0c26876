"""The FastAPI app: factory, lifespan (Redis pools, key ring, store, metrics) and routers."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

import redis
import redis.asyncio
from fastapi import FastAPI

from fgs_common.artifact_store import ArtifactStore
from fgs_common.classifier_sandbox import sweep_check_scratch
from fgs_common.settings import Settings, get_settings
from fgs_service import openapi_document
from fgs_service.auth import KeyRing
from fgs_service.errors import install_error_handlers
from fgs_service.gallery import GalleryCache
from fgs_service.job_queue import JobQueue
from fgs_service.metrics import build_registry
from fgs_service.request_gate import RequestGate
from fgs_service.routers import (
    admin,
    classifiers,
    generate,
    health,
    images,
    jobs,
    metrics,
    model,
    presets,
    thumbnails,
    ui,
    views,
)
from fgs_service.tenant_limits import CheckSlots, TenantSlots


def _open_redis(app: FastAPI, settings: Settings) -> None:
    """The app's Redis clients on `app.state`. Two pools on one server: our records are text, RQ's job hashes are
    bytes. The enqueue path has an asyncio client of its own, so that a POST /v1/generate never waits for a
    threadpool thread. Blocking pools: under a burst of requests a request waits for a connection (up to
    FGS_REDIS_POOL_TIMEOUT_S) instead of failing, as redis-py's default pool does past 100 connections."""
    url, size, wait = settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s
    app.state.redis = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=size, timeout=wait, decode_responses=True
        )
    )
    app.state.rq_redis = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=size, timeout=wait)
    )
    app.state.async_redis = redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=size, timeout=wait, decode_responses=True
        )
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the environment's (FGS_*)."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("FGS_REDIS_URL is not set (fgs up starts a local Redis and sets it)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _open_redis(app, settings)
        app.state.job_queue = JobQueue(app.state.redis, app.state.rq_redis, app.state.async_redis, settings)
        app.state.store = ArtifactStore(settings.data_dir)
        sweep_check_scratch(settings.data_dir)  # what a killed API's classifier checks left
        app.state.keyring = KeyRing.from_settings(settings)
        app.state.metrics_registry = build_registry(app.state.job_queue)
        # Everything alive now lives as long as the process: keep the cyclic garbage collector from scanning
        # it again and again (its full passes were the API's longest pauses under load).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            app.state.redis.close()
            app.state.rq_redis.close()
            await app.state.async_redis.aclose()

    app = FastAPI(
        title="fgs",
        version="1",
        summary="Feedback-guided data synthesis: balance long-tailed datasets with classifier-guided unCLIP sampling",
        description=openapi_document.DESCRIPTION,
        generate_unique_id_function=openapi_document.operation_id,
        lifespan=lifespan,
        # served by fgs_service.routers.ui from vendored files: the defaults load Swagger UI and ReDoc from a CDN
        docs_url=None,
        redoc_url=None,
    )

    # On app.state, not through dependency_overrides: an override makes FastAPI re-inspect the dependency's
    # signature on every request (measured: 6% of an enqueue's CPU).
    app.state.settings = settings
    app.state.classifier_check_slots = CheckSlots(settings)
    app.state.sse_streams = TenantSlots(
        settings.max_sse_streams_per_tenant,
        "too_many_streams",
        "progress streams open",
        "FGS_MAX_SSE_STREAMS_PER_TENANT",
        settings.sse_retry_after_s,
    )
    app.state.gallery_cache = GalleryCache(settings.gallery_cache_images, settings.job_record_ttl_s)
    app.state.view_requests = TenantSlots(
        settings.max_view_requests_per_tenant,
        "too_many_view_requests",
        "gallery or compare requests",
        "FGS_MAX_VIEW_REQUESTS_PER_TENANT",
        1,
    )
    install_error_handlers(app)
    app.add_middleware(RequestGate, settings=settings)

    # thumbnails before images: /v1/images/{image_id}/thumbnail must not be taken for an image id
    for module in (thumbnails, images, classifiers, generate, jobs, model, views, admin, health, metrics, presets, ui):
        app.include_router(module.router)
    ui.mount_static(app)
    openapi_document.install(app)
    return app
