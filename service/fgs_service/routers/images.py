"""Conditioning-image upload and image download (uploaded and generated images alike)."""

from __future__ import annotations

import io
import warnings

from fastapi import APIRouter, UploadFile
from fastapi.responses import FileResponse
from PIL import Image, UnidentifiedImageError

from fgs_common.wire import ImageUploaded
from fgs_service.deps import SettingsDep, StoreDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError, not_found
from fgs_service.uploads import read_limited

router = APIRouter(prefix="/v1/images", tags=["images"], responses=ERROR_RESPONSES)

_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def check_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Decode `data` fully without trusting its header; returns (format, width, height) or raises ApiError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ApiError(413, "image_too_large", f"image has too many pixels (decompression bomb?): {error}") from None
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image", "the upload is not a PNG, JPEG or WebP image") from None
    with image:
        fmt = _FORMATS.get(image.format or "")
        if fmt is None:
            raise ApiError(
                415, "unsupported_image_format", f"image format {image.format} is not accepted; send PNG, JPEG or WebP"
            )
        width, height = image.size
        # Checked on the header's size before decoding: a small file can declare an enormous image.
        if width * height > max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ApiError(
                400, "corrupt_image", f"image could not be decoded (truncated or damaged): {error}"
            ) from None
    return fmt, width, height


@router.post("", status_code=201)
def upload_image(file: UploadFile, tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> ImageUploaded:
    """Store a conditioning image; its id is the sha256 of its bytes (same bytes, same id, first name and date)."""
    data = read_limited(file, settings.max_upload_bytes, "image")
    fmt, width, height = check_image(data, settings.max_image_pixels)
    image_id = store.put_image(tenant.name, data, fmt)
    name = (file.filename or "")[:200]
    record = store.record_upload(tenant.name, image_id, {"name": name, "width": width, "height": height})
    return ImageUploaded(image_id=image_id, **record)


@router.get("")
def list_images(tenant: TenantDep, store: StoreDep) -> list[ImageUploaded]:
    """The caller's uploaded conditioning images (not the generated ones), oldest first."""
    uploaded = [ImageUploaded.model_validate(record) for record in store.uploads(tenant.name)]
    return sorted(uploaded, key=lambda image: (image.created_at, image.image_id))


@router.delete("/{image_id}", status_code=204)
def delete_image(image_id: str, tenant: TenantDep, store: StoreDep) -> None:
    """Delete an image. A job that still needs it as conditioning and has not started fails with `conditioning
    image ... is no longer in the artifact store`; a running job has already loaded it and finishes."""
    if not store.delete_image(tenant.name, image_id):
        raise not_found("image", image_id)


@router.get("/{image_id}", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def download_image(image_id: str, tenant: TenantDep, store: StoreDep) -> FileResponse:
    """The image's bytes; generated PNGs carry their generation parameters in a text chunk ('fgs')."""
    path = store.image_path(tenant.name, image_id)
    if path is None:
        raise not_found("image", image_id)
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix.lstrip(".")])
