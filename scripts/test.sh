#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the CPU test suite.
# Slow tests are opt-in: OCTAVO_RUN_SLOW=1 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
