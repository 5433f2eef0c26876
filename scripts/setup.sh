#!/usr/bin/env bash
# Set up fgs from nothing: system packages it needs, the virtualenv at .venv/ and the project in it (editable).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# the web page's end-to-end tests drive this browser (playwright never downloads one of its own here)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ "${FGS_WITH_PROMETHEUS:-0}" = 1 ] && ! command -v promtool >/dev/null 2>&1; then need_apt+=(prometheus); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing system packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null; fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.fgs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ lab/pyproject.toml -nt "$stamp" ]; then
  echo "==> installing fgs into .venv (torch 2.13.0 CPU build where no GPU build is wanted)"
  # torch first and pinned: an unpinned resolve could pull a multi-GB CUDA wheel.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[all,dev]"
  # the lab (training and experiments) is a distribution of its own: never in a deployment image
  .venv/bin/python -m pip install -q -e ./lab
  touch "$stamp"
fi
