#!/usr/bin/env bash
# GPU validation on a CUDA machine with torch, triton and transformers installed:
#   scripts/gpu_check.sh kernels       CUDA tests of the Triton kernels against the PyTorch reference
#   scripts/gpu_check.sh engine        CUDA tests of the engine: parity with transformers, async scheduling,
#                                      the Triton backend against the reference (each mode a few minutes)
#   scripts/gpu_check.sh qwen3 [OUT]   qwen3-0.6b fixed (with both HF peers, about 5 min) and var; JSON into OUT
#   scripts/gpu_check.sh llama3 [OUT]  llama3-8b fixed 256 with HF static (about 3 min); JSON into OUT
#   scripts/gpu_check.sh families [OUT] the ALiBi / soft-cap kernel arguments on CUDA against the reference,
#                                      and every dense family's parity with transformers on CUDA (about
#                                      3 min); a table per test, JSON into OUT
# Runs from a source checkout without installing (PYTHONPATH), so it works where pip cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/gpu_check.sh kernels|engine|qwen3|llama3|families [OUT]}
out=${2:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
bench() { python -m octavo.entrypoints.cli bench throughput "$@"; }
# pytest with a JUnit report, then one line per test and the same as JSON: report NAME PYTEST-ARGS...
report() {
    local name=$1; shift
    local status=0
    python -m pytest -q -p no:cacheprovider --junitxml="$out/$name.xml" "$@" || status=$?
    python - "$out/$name.xml" "$out/$name.json" <<'PY'
import json, sys, xml.etree.ElementTree as ET
rows = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    rows.append({"test": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2)})
for row in rows:
    print(f"{row['outcome']:>8} {row['seconds']:7.2f}s  {row['test']}")
json.dump(rows, open(sys.argv[2], "w"), indent=1)
PY
    return $status
}

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
families)
    # Kernel arguments: ALiBi and soft-capping in the decode and prefill kernels, small and large shapes.
    status=0
    report families-kernels tests/test_triton_ops.py -k "alibi or soft_cap or score_mods" || status=1
    # Each dense family token-exact with transformers (float32, Triton kernels, CUDA graphs), and the
    # Triton backend against the PyTorch one on the ALiBi and soft-cap models.
    families="gemma or phi or gptj or bigcode or falcon or bloom or aquila or longrope"
    OCTAVO_TEST_DEVICE=cuda report families-parity tests/test_parity.py tests/test_triton_ops.py \
        -k "($families) and not large_shapes" || status=1
    exit $status
    ;;
*)
    echo "unknown mode $what: use kernels, engine, qwen3, llama3 or families" >&2
    exit 2
    ;;
esac
