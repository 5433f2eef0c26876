#!/usr/bin/env bash
# The fgs demo from a fresh clone: set up .venv/, then balance Digits-LT through the embedded stack with entropy
# feedback and print the before/after accuracy table. Everything lands in ./demo-out/ (rerunning resumes/reuses it).
# Extra arguments go to examples/demo.py (e.g. --omega 0.2, --target 40, --work DIR); see `--help`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
