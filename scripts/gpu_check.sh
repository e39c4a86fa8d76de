#!/usr/bin/env bash
# GPU validation on a CUDA machine with torch, triton and transformers installed:
#   scripts/gpu_check.sh kernels       CUDA tests of the Triton kernels against the PyTorch reference
#   scripts/gpu_check.sh engine        CUDA tests of the engine: parity with transformers, async scheduling,
#                                      the Triton backend against the reference (each mode a few minutes)
#   scripts/gpu_check.sh qwen3 [OUT]   qwen3-0.6b fixed (with both HF peers, about 5 min) and var; JSON into OUT
#   scripts/gpu_check.sh llama3 [OUT]  llama3-8b fixed 256 with HF static (about 3 min); JSON into OUT
#   scripts/gpu_check.sh moe [OUT]     fused-MoE kernels against the reference (1..8192 tokens, CUDA graphs), MoE
#                                      parity with transformers, then mixtral-8x7b (bf16, 93 GB) fixed 256 with
#                                      HF static on its first 128 requests (MOE_PEER_PROMPTS=256 for all; about 8 min)
# Runs from a source checkout without installing (PYTHONPATH), so it works where pip cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/gpu_check.sh kernels|engine|qwen3|llama3|moe [OUT]}
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
moe)
    # Every part runs even if an earlier one fails: the GPU time is spent either way.
    status=0
    python -m pytest -q -p no:cacheprovider tests/test_fused_moe.py --junitxml "$out/moe-kernels.xml" || status=1
    echo "moe: kernel tests done at ${SECONDS}s"
    OCTAVO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_parity.py \
        -k "mixtral or qwen2_moe or qwen3_moe" --junitxml "$out/moe-parity.xml" || status=1
    echo "moe: parity tests done at ${SECONDS}s"
    # HF static on two of its 64-request batches keeps the mode within 9 minutes (an estimate from the llama3
    # run plus the expert weights); its tok/s hardly depends on how many batches run.
    bench --model dummy:mixtral-8x7b --workload fixed --num-prompts 256 --max-num-seqs 256 --compare hf-static \
        --peer-num-prompts "${MOE_PEER_PROMPTS:-128}" --gpu-memory-utilization 0.9 \
        --output "$out/mixtral-8x7b-fixed-256.json" || status=1
    echo "moe: benchmark done at ${SECONDS}s"
    exit $status
    ;;
*)
    echo "unknown mode $what: use kernels, engine, qwen3, llama3 or moe" >&2
    exit 2
    ;;
esac
