"""API keys -> tenants. Keys are stored only as sha256 digests.

Keys file (FGS_API_KEYS_FILE, or the same JSON inline in FGS_API_KEYS):

    {"tenants": [{"name": "vision-team", "key_sha256": ["<hex>", ...], "max_queued_images": 100000},
                 {"name": "ops", "key_sha256": ["<hex>"], "admin": true}]}

An admin tenant's key also opens the operator view (/v1/admin/..., every tenant's load and failures).

`fgs hash-key KEY` prints a key's digest. FGS_DEV_API_KEY adds one tenant (FGS_DEV_TENANT, default "dev")
for local use; it is an admin key only when no keys file is given (FGS_API_KEYS_FILE, FGS_API_KEYS): beside one,
the keys file alone says who is an operator. API keys are long random strings, so an unsalted sha256 is
enough to make a leaked file useless.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

from fgs_common.settings import Settings


class TenantEntry(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_sha256: list[str] = Field(min_length=1)
    max_queued_images: int | None = Field(default=None, ge=0)
    admin: bool = Field(default=False, description="may read the operator view of all tenants")

    @field_validator("name")
    @classmethod
    def _not_a_relative_folder(cls, name: str) -> str:
        # The name is the tenant's folder in the artifact store: "." or ".." would be another tenant's or the root.
        if name in (".", ".."):
            raise ValueError(f"tenant name {name!r} is not allowed")
        return name


class KeysFile(BaseModel):
    tenants: list[TenantEntry]


@dataclass(frozen=True)
class Tenant:
    name: str
    max_queued_images: int
    admin: bool = False


# Where a key comes from and how to pass it: the first thing a newcomer with a 401 needs to know.
KEY_HELP = (
    "An API key comes from the service's operator (who adds its sha256 from `fgs hash-key KEY` to the keys file, "
    "FGS_API_KEYS_FILE); on a local `fgs up` it is FGS_DEV_API_KEY. Pass it as 'Authorization: Bearer <key>', "
    "or to fgs-client with --api-key or the FGS_API_KEY environment variable."
)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the scheme in any case, as HTTPBearer reads it)."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def dev_key_is_admin(settings: Settings) -> bool:
    """Whether FGS_DEV_API_KEY opens the operator view: only without a keys file, where the local developer runs
    the whole stack and is its operator too."""
    return settings.api_keys_file is None and not settings.api_keys


class KeyRing:
    """Maps a presented key to its tenant."""

    def __init__(self, by_digest: dict[str, Tenant]):
        self._by_digest = by_digest

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        entries: list[TenantEntry] = []
        if settings.api_keys_file is not None:
            entries += KeysFile.model_validate_json(settings.api_keys_file.read_text()).tenants
        if settings.api_keys:
            entries += KeysFile.model_validate(json.loads(settings.api_keys)).tenants
        by_digest: dict[str, Tenant] = {}
        for entry in entries:
            cap = settings.max_queued_images_per_tenant if entry.max_queued_images is None else entry.max_queued_images
            tenant = Tenant(entry.name, cap, admin=entry.admin)
            for digest in entry.key_sha256:
                by_digest[digest.lower()] = tenant
        if settings.dev_api_key:
            dev = Tenant(settings.dev_tenant, settings.max_queued_images_per_tenant, admin=dev_key_is_admin(settings))
            by_digest[hash_key(settings.dev_api_key)] = dev
        return cls(by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def tenant_for(self, api_key: str) -> Tenant | None:
        # Looking up the digest leaks nothing useful about the key itself, so a dict lookup is fine.
        return self._by_digest.get(hash_key(api_key))
