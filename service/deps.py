"""Typed dependencies: settings, Redis, the queue adapter, the artifact store and the calling tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from fgs_common.artifact_store import ArtifactStore
from fgs_common.settings import Settings, get_settings
from fgs_service.auth import KeyRing, Tenant
from fgs_service.errors import ApiError
from fgs_service.job_queue import JobQueue

SettingsDep = Annotated[Settings, Depends(get_settings)]


def _redis(request: Request):
    return request.app.state.redis


def _job_queue(request: Request) -> JobQueue:
    return request.app.state.job_queue


def _store(request: Request) -> ArtifactStore:
    return request.app.state.store


def _keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


def _tenant(request: Request, keyring: Annotated[KeyRing, Depends(_keyring)]) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <api key>'")
    tenant = keyring.tenant_for(key.strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key")
    return tenant


RedisDep = Annotated[object, Depends(_redis)]
JobQueueDep = Annotated[JobQueue, Depends(_job_queue)]
StoreDep = Annotated[ArtifactStore, Depends(_store)]
TenantDep = Annotated[Tenant, Depends(_tenant)]
