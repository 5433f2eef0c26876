"""Settings for an in-process app or JobQueue on the session's redis-server, under a key prefix of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fgs_common.settings import Settings
from support.stack import keys_document

if TYPE_CHECKING:
    from fgs_client.http_client import Client


def fresh_prefix() -> str:
    """A Redis key prefix no other test uses: tests share one redis-server, never keys."""
    return "fgs-fast-" + uuid.uuid4().hex[:8]


def service_settings(redis_url: str, data_dir: Path, **overrides) -> Settings:
    """The test tenants (support.stack.TENANT_KEYS), a fresh prefix, and no classifier check subprocess
    (the end-to-end tests run that check; here an upload is only recognised by its zip layout)."""
    values = dict(
        redis_url=redis_url,
        redis_prefix=fresh_prefix(),
        data_dir=data_dir,
        api_keys=keys_document(),
        api_keys_file=None,
        dev_api_key=None,
        classifier_check=False,
        job_retries=1,
        retry_backoff_s=[1],
    )
    values.update(overrides)
    return Settings(**values)


@contextmanager
def in_process_client(settings: Settings, tenant: str = "alpha") -> Iterator[Client]:
    """An fgs_client Client whose calls go to `create_app(settings)` in this process (no uvicorn, no workers)."""
    from fastapi.testclient import TestClient

    from fgs_client.http_client import Client
    from fgs_service.app import create_app
    from support.stack import TENANT_KEYS

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}) as http:
        client = Client("http://testserver", None, retries=0)
        client._http = http
        yield client
