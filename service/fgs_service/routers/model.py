"""GET /v1/model: the model the workers keep resident and the largest image it takes."""

from __future__ import annotations

from pathlib import PurePosixPath

from fastapi import APIRouter

from fgs_common.wire import ModelInfo
from fgs_service.deps import JobQueueDep, TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError

router = APIRouter(tags=["model"], responses=ERROR_RESPONSES)


@router.get("/v1/model")
async def model_info(tenant: TenantDep, queue: JobQueueDep) -> ModelInfo:
    """As the workers publish it; a generate request for bigger images than `max_pixels_per_image` is a 422."""
    info = await queue.model_info()
    if info is None:
        # 404, not 503: nothing is failing, there is no model to describe yet (a worker publishes it on start)
        raise ApiError(
            404,
            "no_model_yet",
            "no worker has published its model yet; retry once one has started",
            headers={"Retry-After": "30"},
        )
    return without_server_paths(info)


def without_server_paths(info: ModelInfo) -> ModelInfo:
    """The model and its card by name, never by the workers' paths (/models/sd21-unclip says how the servers are
    laid out, which no tenant needs): a folder as its last part, a card file as its name; URLs and ids stay."""
    if "://" not in info.model and "/" in info.model:
        info = info.model_copy(update={"model": PurePosixPath(info.model).name})
    card = info.model_card
    if card and "://" not in card and "/" in card:
        info = info.model_copy(update={"model_card": f"{info.model}/{PurePosixPath(card).name}"})
    return info
