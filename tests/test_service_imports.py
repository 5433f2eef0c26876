"""The API process never imports torch (nor does the wire format import FastAPI)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack  # a fresh interpreter


def test_service_and_wire_format_do_not_import_torch():
    code = (
        "import sys\n"
        "import fgs_common.wire, fgs_common.job_records, fgs_common.artifact_store, fgs_common.telemetry\n"
        "assert 'fastapi' not in sys.modules and 'torch' not in sys.modules, 'wire format pulled in fastapi/torch'\n"
        "import fgs_service.app, fgs_service.cli\n"
        "from fgs_service.app import create_app\n"
        "from fgs_common.settings import Settings\n"
        "create_app(Settings(redis_url='redis://127.0.0.1:1/0')).openapi()\n"
        "assert 'torch' not in sys.modules, 'the service imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
