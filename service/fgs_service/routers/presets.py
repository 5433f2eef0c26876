"""GET /v1/presets: the named generation settings and the source of every value (common/fgs_common/presets.py).

A client sends a preset's `params` values (and its own changes) as the fields of POST /v1/generate; the service
does not expand preset names itself, so a job's record always holds the values it ran with.
"""

from __future__ import annotations

from fastapi import APIRouter

from fgs_common.presets import PRESETS, Preset, PresetList, get_preset
from fgs_service.deps import TenantDep
from fgs_service.errors import ERROR_RESPONSES, ApiError

router = APIRouter(prefix="/v1/presets", tags=["presets"], responses=ERROR_RESPONSES)


@router.get("")
def list_presets(tenant: TenantDep) -> PresetList:
    return PresetList(presets=list(PRESETS.values()))


@router.get("/{name}")
def read_preset(name: str, tenant: TenantDep) -> Preset:
    try:
        return get_preset(name)
    except KeyError as error:
        raise ApiError(404, "not_found", str(error.args[0])) from None
