"""fgs_service.auth.KeyRing: API keys to tenants, from the keys file, inline JSON and the dev key."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fgs_common.settings import Settings
from fgs_service.auth import KeyRing, Tenant, hash_key


def settings(tmp_path, **values) -> Settings:
    base = dict(api_keys_file=None, api_keys=None, dev_api_key=None, max_queued_images_per_tenant=500)
    return Settings(**{**base, **values})


def test_keys_from_file_inline_json_and_the_dev_key(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps(
            {
                "tenants": [
                    # digests are matched case-insensitively: a file written with upper-case hex still works
                    {
                        "name": "vision",
                        "key_sha256": [hash_key("v-key-1"), hash_key("v-key-2").upper()],
                        "max_queued_images": 7,
                    },
                ]
            }
        )
    )
    inline = json.dumps({"tenants": [{"name": "speech", "key_sha256": [hash_key("s-key")]}]})
    ring = KeyRing.from_settings(settings(tmp_path, api_keys_file=keys_file, api_keys=inline, dev_api_key="dev-key"))
    assert len(ring) == 4
    assert ring.tenant_for("v-key-1") == Tenant("vision", 7)
    assert ring.tenant_for("v-key-2") == Tenant("vision", 7)
    assert ring.tenant_for("s-key") == Tenant("speech", 500)  # no cap of its own: the default
    # beside a keys file the dev key is a tenant like the others: the keys file alone names operators
    assert ring.tenant_for("dev-key") == Tenant("dev", 500, admin=False)
    assert ring.tenant_for("V-KEY-1") is None  # keys themselves are case-sensitive
    assert ring.tenant_for("") is None


def test_the_dev_key_is_an_admin_key_only_without_a_keys_file(tmp_path):
    """Issue 19: FGS_DEV_API_KEY was silently an admin key even beside a keys file."""
    alone = KeyRing.from_settings(settings(tmp_path, dev_api_key="dev-key"))
    assert alone.tenant_for("dev-key") == Tenant("dev", 500, admin=True)  # the local operator of `fgs up`
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"tenants": [{"name": "ops", "key_sha256": [hash_key("o")], "admin": True}]}))
    inline = json.dumps({"tenants": [{"name": "speech", "key_sha256": [hash_key("s-key")]}]})
    for keys in ({"api_keys_file": keys_file}, {"api_keys": inline}):
        ring = KeyRing.from_settings(settings(tmp_path, dev_api_key="dev-key", **keys))
        assert ring.tenant_for("dev-key") == Tenant("dev", 500, admin=False), keys


def test_no_keys_configured_admits_nobody(tmp_path):
    ring = KeyRing.from_settings(settings(tmp_path))
    assert len(ring) == 0 and ring.tenant_for("anything") is None


def test_a_cap_of_zero_is_kept_not_replaced_by_the_default(tmp_path):
    inline = json.dumps({"tenants": [{"name": "frozen", "key_sha256": [hash_key("f")], "max_queued_images": 0}]})
    assert KeyRing.from_settings(settings(tmp_path, api_keys=inline)).tenant_for("f") == Tenant("frozen", 0)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"tenants": [{"name": "../etc", "key_sha256": ["ab"]}]}, "name"),
        ({"tenants": [{"name": "..", "key_sha256": ["ab"]}]}, "tenant name '..' is not allowed"),
        ({"tenants": [{"name": "ok", "key_sha256": []}]}, "key_sha256"),
        ({"tenants": [{"name": "ok", "key_sha256": ["ab"], "max_queued_images": -1}]}, "max_queued_images"),
        ({"tenant": []}, "tenants"),
    ],
)
def test_a_bad_keys_file_is_refused_at_start(tmp_path, document, message):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(document))
    with pytest.raises(ValidationError, match=message):
        KeyRing.from_settings(settings(tmp_path, api_keys_file=keys_file))
