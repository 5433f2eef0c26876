"""GET /v1/images/{image_id}/thumbnail: a small WebP of an image, for grids (the page never loads full images there)."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from fgs_service.deps import StoreDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, not_found
from fgs_service.thumbnails import THUMBNAIL_MEDIA_TYPE, ThumbnailCache

router = APIRouter(prefix="/v1/images", tags=["images"], responses=ERROR_RESPONSES)

# Ids are content digests: a thumbnail never changes, so the browser may keep it as long as it likes
# (private: it was fetched with the tenant's key).
_CACHE_CONTROL = "private, max-age=31536000, immutable"


@router.get(
    "/{image_id}/thumbnail",
    response_class=FileResponse,
    responses={200: {"content": {THUMBNAIL_MEDIA_TYPE: {}}}, 304: {"description": "the cached copy is current"}},
)
async def image_thumbnail(
    image_id: str,
    request: Request,
    tenant: TenantDep,
    store: StoreDep,
    size: Annotated[
        int, Query(ge=32, le=512, description="longest side in pixels (never larger than the image)")
    ] = 160,
) -> Response:
    """A WebP thumbnail of one of the caller's images, made on first request and cached on disk."""
    etag = f'"{image_id}-{size}"'
    path = await anyio.to_thread.run_sync(ThumbnailCache(store).path, tenant.name, image_id, size)
    if path is None:
        raise not_found("image", image_id)
    headers = {"Cache-Control": _CACHE_CONTROL, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=THUMBNAIL_MEDIA_TYPE, headers=headers)
