#!/usr/bin/env bash
# GPU validation on a CUDA machine with torch, triton and transformers installed:
#   scripts/gpu_check.sh kernels       CUDA tests of the Triton kernels against the PyTorch reference
#   scripts/gpu_check.sh engine        CUDA tests of the engine: parity with transformers, async scheduling,
#                                      the Triton backend against the reference (each mode a few minutes)
#   scripts/gpu_check.sh qwen3 [OUT]   qwen3-0.6b fixed (with both HF peers, about 5 min) and var; JSON into OUT
#   scripts/gpu_check.sh llama3 [OUT]  llama3-8b fixed 256 with HF static (about 3 min); JSON into OUT
#   scripts/gpu_check.sh structured [OUT]  qwen3-0.6b: 256 JSON-schema requests against the same requests
#                                      unconstrained (tok/s, ratio, bitmask-fill step profile), then the
#                                      structured-output and watermark tests on CUDA; needs xgrammar
#                                      (and jsonschema for the tests); about 3 min
# Runs from a source checkout without installing (PYTHONPATH), so it works where pip cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/gpu_check.sh kernels|engine|qwen3|llama3|structured [OUT]}
out=${2:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
bench() { python -m octavo.entrypoints.cli bench throughput "$@"; }

case "$what" in
kernels)
    python -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_fused_ops.py
    ;;
engine)
    OCTAVO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_async_scheduling.py \
        tests/test_parity.py
    ;;
qwen3)
    bench --model dummy:qwen3-0.6b --workload fixed --num-prompts 512 --max-num-seqs 512 \
        --compare hf-static,hf-cb --output "$out/qwen3-fixed-512.json"
    bench --model dummy:qwen3-0.6b --workload var --num-prompts 256 --max-num-seqs 256 \
        --output "$out/qwen3-var-256.json"
    ;;
llama3)
    bench --model dummy:llama3-8b --workload fixed --num-prompts 256 --max-num-seqs 256 \
        --compare hf-static --output "$out/llama3-8b-fixed-256.json"
    ;;
structured)
    python -m octavo.benchmarks.structured --model dummy:qwen3-0.6b --num-prompts 256 --max-tokens 256 \
        --output "$out/structured-256.json"
    OCTAVO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_structured_output.py \
        tests/test_watermark.py
    ;;
*)
    echo "unknown mode $what: use kernels, engine, qwen3, llama3 or structured" >&2
    exit 2
    ;;
esac
