"""Typed dependencies: settings, Redis, the queue adapter, the artifact store and the calling tenant.

They are `async def` although none awaits: FastAPI runs a plain `def` dependency in the threadpool, and a
thread hop per dependency per request was most of the enqueue latency under load (bench/api.py).
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Request

from fgs_common.artifact_store import ArtifactStore
from fgs_common.settings import Settings
from fgs_service.auth import KeyRing, Tenant
from fgs_service.errors import ApiError
from fgs_service.job_queue import JobQueue


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _redis(request: Request):
    return request.app.state.redis


async def _job_queue(request: Request) -> JobQueue:
    return request.app.state.job_queue


async def _store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def _check_slots(request: Request) -> threading.BoundedSemaphore:
    return request.app.state.classifier_check_slots


async def _keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


async def _tenant(request: Request, keyring: Annotated[KeyRing, Depends(_keyring)]) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <api key>'")
    tenant = keyring.tenant_for(key.strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key")
    return tenant


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[object, Depends(_redis)]
JobQueueDep = Annotated[JobQueue, Depends(_job_queue)]
StoreDep = Annotated[ArtifactStore, Depends(_store)]
TenantDep = Annotated[Tenant, Depends(_tenant)]
# One slot per classifier check that may run at once (FGS_CLASSIFIER_CHECKS_AT_ONCE).
CheckSlotsDep = Annotated[threading.BoundedSemaphore, Depends(_check_slots)]
