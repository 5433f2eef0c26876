"""The web page (/ui), its static files, and /docs and /redoc served from vendored assets (no CDN)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
VENDOR = "/ui/static/vendor"
FAVICON = f"{VENDOR}/swagger-ui/favicon-32x32.png"

# Nothing outside this server: ReDoc's sidebar asks a CDN for its logo, which the policy stops in the browser
# (the image then hides itself). Inline scripts and styles: the docs pages bootstrap inline; blob: workers: ReDoc.
_DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'"
)
# The page sets inline styles (progress bars) but runs only its own script.
_PAGE_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self' blob:"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
async def ui_without_slash() -> RedirectResponse:
    # the page's relative asset paths resolve under /ui/
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def ui_page() -> FileResponse:
    # no-cache: a new deployment's page is picked up at once (static files are revalidated by ETag)
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": _PAGE_POLICY}
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=headers)


def _offline_docs(render: Callable[..., HTMLResponse], **assets: Any) -> HTMLResponse:
    """A docs page of this API built by FastAPI's `render`, from the vendored `assets`, kept off the network."""
    page = render(openapi_url="/openapi.json", title="fgs API", **assets)
    page.headers["Content-Security-Policy"] = _DOCS_POLICY
    return page


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return _offline_docs(
        get_swagger_ui_html,
        swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=FAVICON,
        swagger_ui_parameters={"persistAuthorization": False},
    )


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return _offline_docs(
        get_redoc_html,
        redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
        redoc_favicon_url=FAVICON,
        with_google_fonts=False,
    )


def mount_static(app: FastAPI) -> None:
    """The page's CSS/JS and the vendored Swagger UI / ReDoc files under /ui/static."""
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
