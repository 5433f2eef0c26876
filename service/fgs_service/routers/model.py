"""GET /v1/model: the model the workers keep resident and the largest image it takes."""

from __future__ import annotations

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
    return info
