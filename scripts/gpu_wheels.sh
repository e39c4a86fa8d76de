#!/usr/bin/env bash
# Download, into .whl/, the Python 3.12 x86-64 wheels that a GPU machine's image may lack (the server stack,
# the openai client, zmq/msgspec for the engine-core process, xgrammar for structured output); versions are
# those of this checkout's .venv where it has them. scripts/gpu_check.sh installs whatever lies in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(fastapi uvicorn httptools pydantic pydantic_core starlette typing-inspection annotated-types annotated-doc
    openai httpx2 httpcore2 truststore jiter distro sniffio anyio typing_extensions opentelemetry-api
    pyzmq msgspec xgrammar apache-tvm-ffi jsonschema jsonschema-specifications referencing rpds-py gguf)
pinned=()
for name in "${packages[@]}"; do
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" \
        2>/dev/null || true)
    pinned+=("$name${version:+==$version}")
done
mkdir -p .whl
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
    manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${pinned[@]}"
ls .whl
