"""The request gate and the per-tenant caps on an in-process app over the session's Redis (issue 19, items 3, 4, 6):
security headers on every response, the page and the docs still served from vendored files, no body read without
a known key, the defaults of the caps, the gallery/compare cap. The same over real sockets, with slow clients:
tests/test_service_tenant_limits.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fgs_common.settings import Settings
from fgs_service.app import create_app
from fgs_service.request_gate import SECURITY_HEADERS
from support.live_calls import png_bytes
from support.service_settings import service_settings
from support.stack import TENANT_KEYS


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}


@pytest.fixture
def api(redis_server, tmp_path):
    with TestClient(create_app(service_settings(redis_server, tmp_path / "data", max_view_requests_per_tenant=1))) as c:
        yield c


def assert_secure(response) -> None:
    for name, value in SECURITY_HEADERS:
        values = response.headers.get_list(name.decode())
        assert value.decode() in values, (response.request.url, name, values)


def test_every_response_says_no_framing_no_sniffing_no_referrer(api):
    answers = {
        "page": api.get("/ui/"),
        "docs": api.get("/docs"),
        "redoc": api.get("/redoc"),
        "vendored asset": api.get("/ui/static/vendor/swagger-ui/swagger-ui-bundle.js"),
        "openapi": api.get("/openapi.json"),
        "health": api.get("/healthz"),
        "no key": api.get("/v1/jobs"),
        "not found": api.get("/v1/jobs/nope", headers=auth("alpha")),
        "body without key": api.post("/v1/generate", json={}),
        "too large": api.post("/v1/generate", content=b"x" * (33 * 1024 * 1024), headers=auth("alpha")),
        "ok": api.get("/v1/jobs", headers=auth("alpha")),
    }
    expected = {"page": 200, "docs": 200, "redoc": 200, "vendored asset": 200, "openapi": 200, "health": 200}
    expected |= {"no key": 401, "not found": 404, "body without key": 401, "too large": 413, "ok": 200}
    assert {name: r.status_code for name, r in answers.items()} == expected
    for response in answers.values():
        assert_secure(response)
    # The page and the docs keep their own policies (nothing but this server), beside frame-ancestors 'none'.
    page_policies = answers["page"].headers.get_list("content-security-policy")
    assert any("default-src 'self'" in p for p in page_policies) and "frame-ancestors 'none'" in page_policies
    docs_policies = answers["docs"].headers.get_list("content-security-policy")
    assert any("script-src 'self' 'unsafe-inline'" in p for p in docs_policies)
    assert "/ui/static/vendor/swagger-ui/swagger-ui-bundle.js" in answers["docs"].text


def test_a_body_without_a_known_key_is_401_before_it_is_read(api):
    for headers, reason in (({}, "no API key was sent"), (auth("alpha") | {"Authorization": "Bearer nope"}, "not one")):
        response = api.post("/v1/images", files={"file": ("a.png", png_bytes(), "image/png")}, headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["connection"] == "close"
        message = response.json()["error"]["message"]
        assert reason in message and "the request body was not read" in message and "fgs hash-key" in message
    assert api.post("/v1/images", files={"file": ("a.png", png_bytes(), "image/png")}, headers=auth("alpha")).is_success


def test_the_defaults_of_the_per_tenant_caps():
    """What SECURITY.md states; the provenance is in common/fgs_common/settings.py."""
    defaults = Settings(_env_file=None)
    assert defaults.max_sse_streams_per_tenant == 64 and defaults.sse_retry_after_s == 5
    assert defaults.max_view_requests_per_tenant == 2
    assert (defaults.classifier_checks_at_once, defaults.classifier_checks_per_tenant) == (2, 1)
    assert (defaults.http_body_timeout_s, defaults.http_body_min_rate) == (20.0, 500)


def test_gallery_and_compare_are_capped_per_tenant(api):
    """A tenant with FGS_MAX_VIEW_REQUESTS_PER_TENANT (here 1) views in progress gets 429; another tenant does not.

    The request in progress is the app's own slot held as a gallery request holds it (a request of a few ms
    cannot be caught in flight reliably)."""
    views = api.app.state.view_requests
    views.acquire("alpha")
    try:
        for path in ("/v1/views/gallery", "/v1/views/compare?class_index=0"):
            refused = api.get(path, headers=auth("alpha"))
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_view_requests"
            assert "FGS_MAX_VIEW_REQUESTS_PER_TENANT" in refused.json()["error"]["message"]
            assert api.get(path, headers=auth("beta")).status_code == 200
    finally:
        views.release("alpha")
    assert api.get("/v1/views/gallery", headers=auth("alpha")).status_code == 200
    assert views.held("alpha") == 0 and views.held("beta") == 0  # every request gave its slot back
