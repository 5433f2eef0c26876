"""Typed dependencies: settings, Redis, the queue adapter, the artifact store and the calling tenant.

They are `async def` although none awaits: FastAPI runs a plain `def` dependency in the threadpool, and a
thread hop per dependency per request was most of the enqueue latency under load (bench/api.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fgs_common.artifact_store import ArtifactStore
from fgs_common.settings import Settings
from fgs_service.auth import KEY_HELP, KeyRing, Tenant
from fgs_service.errors import ApiError
from fgs_service.gallery import GalleryCache
from fgs_service.job_queue import JobQueue
from fgs_service.tenant_limits import CheckSlots, TenantSlots


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _redis(request: Request):
    return request.app.state.redis


async def _job_queue(request: Request) -> JobQueue:
    return request.app.state.job_queue


async def _store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def _check_slots(request: Request) -> CheckSlots:
    return request.app.state.classifier_check_slots


async def _keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


# Declares the Bearer scheme in the OpenAPI schema (Swagger's Authorize button); auto_error=False so that a
# missing key gets our own 401 body rather than FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="the tenant's API key")


async def _tenant(
    keyring: Annotated[KeyRing, Depends(_keyring)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None or not credentials.credentials.strip():
        raise ApiError(401, "unauthorized", f"no API key was sent. {KEY_HELP}")
    tenant = keyring.tenant_for(credentials.credentials.strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", f"the API key is not one this service knows. {KEY_HELP}")
    return tenant


async def _view_slot(request: Request, tenant: Annotated[Tenant, Depends(_tenant)]) -> AsyncIterator[None]:
    """One of the tenant's gallery/compare slots (FGS_MAX_VIEW_REQUESTS_PER_TENANT), held while the request runs."""
    slots: TenantSlots = request.app.state.view_requests
    with slots.hold(tenant.name):
        yield


async def _admin(tenant: Annotated[Tenant, Depends(_tenant)]) -> Tenant:
    if not tenant.admin:
        raise ApiError(403, "forbidden", "this API key is not marked admin in the keys file")
    return tenant


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[object, Depends(_redis)]
JobQueueDep = Annotated[JobQueue, Depends(_job_queue)]
StoreDep = Annotated[ArtifactStore, Depends(_store)]
TenantDep = Annotated[Tenant, Depends(_tenant)]
AdminDep = Annotated[Tenant, Depends(_admin)]
# The classifier check slots (FGS_CLASSIFIER_CHECKS_AT_ONCE, FGS_CLASSIFIER_CHECKS_PER_TENANT).
CheckSlotsDep = Annotated[CheckSlots, Depends(_check_slots)]
# Held for a gallery or compare request's duration: in the route's `dependencies`.
ViewSlot = Depends(_view_slot)


async def _sse_streams(request: Request) -> TenantSlots:
    """The per-tenant count of open progress streams (FGS_MAX_SSE_STREAMS_PER_TENANT)."""
    return request.app.state.sse_streams


SseStreamsDep = Annotated[TenantSlots, Depends(_sse_streams)]


async def _gallery_cache(request: Request) -> GalleryCache:
    return request.app.state.gallery_cache


GalleryCacheDep = Annotated[GalleryCache, Depends(_gallery_cache)]
