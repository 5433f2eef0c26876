"""The FastAPI app: factory, lifespan (Redis pools, key ring, store, metrics) and routers."""

from __future__ import annotations

import gc
import threading
from contextlib import asynccontextmanager

import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fgs_common.artifact_store import ArtifactStore
from fgs_common.settings import Settings, get_settings
from fgs_service import openapi_document
from fgs_service.auth import KeyRing
from fgs_service.errors import install_error_handlers
from fgs_service.job_queue import JobQueue
from fgs_service.metrics import build_registry
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


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the environment's (FGS_*)."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("FGS_REDIS_URL is not set (fgs up starts a local Redis and sets it)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Two pools on one server: our records are text, RQ's job hashes are bytes. The enqueue path has an
        # asyncio client of its own, so that a POST /v1/generate never waits for a threadpool thread.
        # Blocking pools: under a burst of requests a request waits for a connection (up to
        # FGS_REDIS_POOL_TIMEOUT_S) instead of failing, as redis-py's default pool does past 100 connections.
        size, wait = settings.redis_max_connections, settings.redis_pool_timeout_s
        app.state.redis = redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=size, timeout=wait, decode_responses=True
            )
        )
        app.state.rq_redis = redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=size, timeout=wait
            )
        )
        app.state.async_redis = redis.asyncio.Redis(
            connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=size, timeout=wait, decode_responses=True
            )
        )
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
    app.state.classifier_check_slots = threading.BoundedSemaphore(settings.classifier_checks_at_once)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=settings)

    # thumbnails before images: /v1/images/{id}/thumbnail must not be taken for an image id
    for module in (thumbnails, images, classifiers, generate, jobs, model, views, admin, health, metrics, presets, ui):
        app.include_router(module.router)
    ui.mount_static(app)
    openapi_document.install(app)
    return app


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` as soon as a body passes its route's limit (an HTTPException: FastAPI's body
    parsing lets those through, where any other error would become a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")
        self.limit = limit


class BodyLimit:
    """413 for a request body over its route's limit: at once when its Content-Length says so (or is not a
    number), else while it streams in, chunked bodies included, so no more than the limit is ever held.

    Limits: JSON routes FGS_MAX_JSON_BODY_BYTES; image uploads FGS_MAX_UPLOAD_BYTES; classifier uploads the
    archive plus statistics limits; each with 1 MiB for the multipart framing and form fields.
    A plain ASGI middleware: Starlette's `@app.middleware("http")` wraps every request in extra tasks and
    streams, which showed up as latency under load.
    """

    _FRAMING = 1 << 20

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.limits = {
            "/v1/classifiers": (
                settings.max_classifier_bytes
                + settings.max_hardness_stats_bytes
                + settings.max_upload_bytes
                + self._FRAMING
            ),
            "/v1/images": settings.max_upload_bytes + self._FRAMING,
        }
        self.default = settings.max_json_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"].rstrip("/"), self.default)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _too_large(limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    body = {"error": {"code": "upload_too_large", "message": f"request body over {limit} bytes"}}
    # Connection: close, as the rest of the body is never read
    return JSONResponse(body, status_code=413, headers={"Connection": "close"})
