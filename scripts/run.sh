#!/usr/bin/env bash
# The run command: sets up .venv if needed, then generates with the embedded default model
# (SmolLM2-135M-Instruct, no download). Extra arguments go to `octavo generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$#" -eq 0 ]; then
    set -- "What is the capital of France?"
fi
exec .venv/bin/octavo generate "$@"
