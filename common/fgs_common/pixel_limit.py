"""The one pixel limit: how large an image the workers' model takes (`ModelInfo.max_pixels_per_image`, which
the workers publish). The API refuses a bigger request with a 422; a worker fails a job that reached it anyway
(queued before any worker had published its model) with an InvalidJob."""

from __future__ import annotations

from fgs_common.wire import ModelInfo


def over_pixel_limit(width: int | None, height: int | None, model: ModelInfo) -> str | None:
    """Why an image of `width` x `height` (None: the model's native size) is too large for `model`; None when it
    fits. One step of a bigger image could not finish within its deadline."""
    width, height = width or model.native_width, height or model.native_height
    if width * height <= model.max_pixels_per_image:
        return None
    return (
        f"{width}x{height} = {width * height} pixels per image; model {model.model} takes at most "
        f"{model.max_pixels_per_image} (GET /v1/model)"
    )
