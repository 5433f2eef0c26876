"""The FastAPI app: factory, lifespan (Redis pools, key ring, store, metrics) and routers."""

from __future__ import annotations

import gc
import threading
from contextlib import asynccontextmanager

import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fgs_common.artifact_store import ArtifactStore
from fgs_common.settings import Settings, get_settings
from fgs_service.auth import KeyRing
from fgs_service.errors import install_error_handlers
from fgs_service.job_queue import JobQueue
from fgs_service.metrics import build_registry
from fgs_service.routers import admin, classifiers, generate, health, images, jobs, metrics, thumbnails, ui, views


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the environment's (FGS_*)."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("FGS_REDIS_URL is not set (fgs up starts a local Redis and sets it)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Two pools on one server: our records are text, RQ's job hashes are bytes. The enqueue path has an
        # asyncio client of its own, so that a POST /v1/generate never waits for a threadpool thread.
        app.state.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        app.state.rq_redis = redis.Redis.from_url(settings.redis_url)
        app.state.async_redis = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        app.state.job_queue = JobQueue(app.state.redis, app.state.rq_redis, app.state.async_redis, settings)
        app.state.store = ArtifactStore(settings.data_dir)
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
        lifespan=lifespan,
        # served by fgs_service.routers.ui from vendored files: the defaults load Swagger UI and ReDoc from a CDN
        docs_url=None,
        redoc_url=None,
    )

    # On app.state, not through dependency_overrides: an override makes FastAPI re-inspect the dependency's
    # signature on every request (measured: 6% of an enqueue's CPU).
    app.state.settings = settings
    app.state.classifier_check_slots = threading.BoundedSemaphore(settings.classifier_checks_at_once)
    install_error_handlers(app)
    # A classifier upload carries its archive, its statistics and small form fields; anything else at most an
    # archive-sized body.
    classifier_upload = settings.max_classifier_bytes + settings.max_hardness_stats_bytes + settings.max_upload_bytes
    app.add_middleware(BodyLimit, limit=settings.max_classifier_bytes + 2 * settings.max_upload_bytes,
                       limits_by_path={"/v1/classifiers": classifier_upload})

    # thumbnails before images: /v1/images/{id}/thumbnail must not be taken for an image id
    for module in (thumbnails, images, classifiers, generate, jobs, views, admin, health, metrics, ui):
        app.include_router(module.router)
    ui.mount_static(app)
    return app


class BodyLimit:
    """413 for a request whose Content-Length is over its path's limit (or not a number), before its body is read.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` wraps every request in extra tasks and
    streams, which showed up as latency under load.
    """

    def __init__(self, app: ASGIApp, limit: int, limits_by_path: dict[str, int] | None = None):
        self.app = app
        self.limit = limit
        self.limits_by_path = limits_by_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            limit = self.limits_by_path.get(scope["path"], self.limit)
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > limit):
                body = {"error": {"code": "upload_too_large", "message": f"request body over {limit} bytes"}}
                await JSONResponse(body, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)
