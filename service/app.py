"""The FastAPI app: factory, lifespan (Redis pools, key ring, store, metrics) and routers."""

from __future__ import annotations

from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fgs_common.artifact_store import ArtifactStore
from fgs_common.settings import Settings, get_settings
from fgs_service.auth import KeyRing
from fgs_service.errors import install_error_handlers
from fgs_service.job_queue import JobQueue
from fgs_service.metrics import build_registry
from fgs_service.routers import classifiers, generate, health, images, jobs, metrics


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` defaults to the environment's (FGS_*)."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("FGS_REDIS_URL is not set (fgs up starts a local Redis and sets it)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Two pools on one server: our records are text, RQ's job hashes are bytes.
        app.state.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        app.state.rq_redis = redis.Redis.from_url(settings.redis_url)
        app.state.job_queue = JobQueue(app.state.redis, app.state.rq_redis, settings)
        app.state.store = ArtifactStore(settings.data_dir)
        app.state.keyring = KeyRing.from_settings(settings)
        app.state.metrics_registry = build_registry(app.state.job_queue)
        try:
            yield
        finally:
            app.state.redis.close()
            app.state.rq_redis.close()

    app = FastAPI(
        title="fgs",
        version="1",
        summary="Feedback-guided data synthesis: balance long-tailed datasets with classifier-guided unCLIP sampling",
        lifespan=lifespan,
    )
    app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    body_limit = settings.max_classifier_bytes + 2 * settings.max_upload_bytes

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > body_limit):
            return JSONResponse({"error": {"code": "upload_too_large", "message": f"request body over {body_limit} bytes"}}, status_code=413)
        return await call_next(request)

    for module in (images, classifiers, generate, jobs, health, metrics):
        app.include_router(module.router)
    return app
