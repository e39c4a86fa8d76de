#!/usr/bin/env bash
# GPU validation on a CUDA machine with torch, triton and transformers installed:
#   scripts/gpu_check.sh kernels       CUDA tests of the Triton kernels against the PyTorch reference
#   scripts/gpu_check.sh engine        CUDA tests of the engine: parity with transformers, async scheduling,
#                                      the Triton backend against the reference (each mode a few minutes)
#   scripts/gpu_check.sh qwen3 [OUT]   qwen3-0.6b fixed (with both HF peers, about 5 min) and var; JSON into OUT
#   scripts/gpu_check.sh llama3 [OUT]  llama3-8b fixed 256 with HF static (about 3 min); JSON into OUT
#   scripts/gpu_check.sh limit [OUT]   the fraction-of-limit runs with the tokenizer loaded (outputs detokenized):
#                                      qwen3-0.6b fixed 512 and llama3-8b fixed 256 with HF static on their first 64
#                                      requests, qwen3-0.6b var 256, then step profiles (host against
#                                      device ms) at 64, 256 and 512 sequences (PROFILE_SIZES); each stage under
#                                      its own timeout (about 10 min); JSON and profiles into OUT
#   scripts/gpu_check.sh followup [OUT] what the last device session left unmeasured, each stage under its
#                                      own timeout (about 6 min): qwen3-0.6b 256 JSON-schema requests against
#                                      unconstrained, llama3-8b fixed 256 in bf16, FP8 and W4A16 GPTQ; JSON into OUT
#                                      (then `mixtral` and `families`, and `staging` for the input-staging check)
#   scripts/gpu_check.sh mixtral [OUT] mixtral-8x7b (bf16, 93 GB) fixed 256 with HF static on its first 64
#                                      requests (about 4 min); JSON into OUT
#   scripts/gpu_check.sh staging [OUT] the async fork test FORK_RUNS (2) times with the input staging on and off
#                                      (OCTAVO_INPUT_STAGING), every report into OUT/fork-tests.log
#   scripts/gpu_check.sh moe [OUT]     fused-MoE kernels against the reference (1..8192 tokens, CUDA graphs), MoE
#                                      parity with transformers, then mixtral-8x7b (bf16, 93 GB) fixed 256 with
#                                      HF static on its first 128 requests (MOE_PEER_PROMPTS=256 for all; about 8 min)
#   scripts/gpu_check.sh serve [OUT]   octavo serve on dummy:qwen3-0.6b: openai-client smoke test, bench serve
#                                      (fixed 512 at rate inf, 16, 32), context sweep, then offline LLM.generate
#                                      on the same requests (about 5 min); JSON, PNGs and the server log into OUT.
#                                      Wheels in .whl/ (packages the GPU image lacks) are installed first.
#   scripts/gpu_check.sh families [OUT] the ALiBi / soft-cap kernel arguments on CUDA against the reference,
#                                      and every dense family's parity with transformers on CUDA (about
#                                      6 min on the H200); a table per test, JSON into OUT
#   scripts/gpu_check.sh quant [OUT]   quantized weights: kernel and engine tests on CUDA, a decode micro-benchmark,
#                                      llama3-8b fixed 256 in bf16, FP8 and W4A16 (GPTQ g128; QUANT_FORMATS picks
#                                      which, "auto fp8 gptq" by default; each stage under its own timeout, about
#                                      9 min, QUANT_FORMATS="auto gptq" about 7); JSON into OUT
#   scripts/gpu_check.sh structured [OUT]  qwen3-0.6b: 256 JSON-schema requests against the same requests
#                                      unconstrained (tok/s and ratio, engine core in its own process), the
#                                      constrained run again with the core in process for the bitmask-fill step
#                                      profile, then the structured-output, logits-controls and watermark tests
#                                      on CUDA (in process and across it); needs xgrammar (and jsonschema for
#                                      the tests); about 4 min
#   scripts/gpu_check.sh dp [OUT]      qwen3-0.6b fixed, 2048 requests, offline with one engine (0.9 of the GPU), then with two
#                                      replicas on the one GPU (0.45 each); both and the ratio (about 3 min)
#   scripts/gpu_check.sh tp [OUT]      tensor parallelism: qwen3-0.6b fixed 512 at TP=1 (TP=1 is today's path:
#                                      no worker process, the layers' splits are no-ops); with >= 2 GPUs, TP=2
#                                      greedy equality with TP=1 on llama3-8b- and qwen3-0.6b-shaped dummy models
#                                      (64 requests, float32; again eager where one fails), and llama3-8b
#                                      fixed 256 at TP=1 and TP=2; JSON into OUT (about 6 min with 2 GPUs)
# Runs from a source checkout without installing (PYTHONPATH), so it works where pip cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/gpu_check.sh kernels|engine|qwen3|llama3|limit|followup|mixtral|staging|moe|families|serve|quant|structured|hostcost|dp|tp [OUT]}
out=${2:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Packages the GPU image lacks (pyzmq and msgspec for the engine core's process, xgrammar, the server's), as
# wheels that scripts/gpu_wheels.sh put in .whl/; installed once per machine.
if compgen -G ".whl/*.whl" >/dev/null; then
    wheels=$(ls .whl/*.whl | md5sum)
    [ "$(cat /tmp/site/.octavo-wheels 2>/dev/null)" = "$wheels" ] || { python3 -m pip install -q --no-index \
        --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && echo "$wheels" > /tmp/site/.octavo-wheels; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
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

# One stage of a mode under its own timeout: a failed stage is named in `failed` and the next ones still run
# (the GPU time is spent either way). Call it as `stage NAME SECONDS COMMAND...`; end with `finish`.
failed=()
stage() {
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (timeout ${seconds}s, at ${SECONDS}s)"
    timeout "$seconds" "$@" || { echo "=== $name FAILED (exit $?)"; failed+=("$name"); }
}
finish() {
    if [ ${#failed[@]} -gt 0 ]; then
        printf 'FAILED: %s\n' "${failed[@]}"
        exit 1
    fi
}

# serve: each stage under its own timeout; a failed stage is reported and the next ones still run.
serve_check() {
    local out=$1 model="$1/qwen3-0.6b-dummy" url port server
    # The same engine options for the server and the offline run.
    local engine=(--load-format dummy --device cuda --max-num-seqs 512 --max-model-len 8192)
    stage "dummy model and tokenizer" 120 python -c "import sys; from pathlib import Path
from octavo.benchmarks.workloads import write_dummy_model
from octavo.benchmarks.dummy_tokenizer import write_for_model_folder
write_for_model_folder(write_dummy_model('qwen3-0.6b', Path(sys.argv[1])))" "$model"
    stage "client overhead (stub server, 512 streams)" 120 \
        python -m octavo.benchmarks.client_overhead --concurrency 512 --output-len 256 --interval-ms 10 \
        --output "$out/client-overhead.json"
    port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    url=http://127.0.0.1:$port
    python -m octavo.entrypoints.cli serve "$model" --served-model-name qwen3-0.6b --port "$port" "${engine[@]}" \
        >"$out/server.log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null || true' EXIT
    stage "server start-up" 300 python scripts/serve_smoke.py wait "$url" --timeout 290
    if [ ${#failed[@]} -eq 0 ]; then
        stage "openai client smoke test" 120 python scripts/serve_smoke.py check "$url" --output "$out/openai-smoke.json"
        stage "bench serve, fixed 512 at rate inf, 16, 32" 420 python -m octavo.entrypoints.cli bench serve \
            --base-url "$url" --workload fixed --num-prompts 512 --sweep-rates inf,16,32 \
            --output "$out/serve-fixed-512.json"
        stage "context sweep" 180 python -m octavo.entrypoints.cli bench context-sweep --base-url "$url" \
            --step 2000 --output-len 128 --output "$out/context-sweep.json"
    fi
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    trap - EXIT
    tail -n 5 "$out/server.log"
    if [ -f "$out/serve-fixed-512.json" ]; then
        stage "offline LLM.generate on the same requests" 300 python -m octavo.benchmarks.offline_baseline \
            "$out/serve-fixed-512.json" --model "$model" "${engine[@]}" --skip-tokenizer-too \
            --output "$out/serve-vs-offline.json"
    fi
    if [ ${#failed[@]} -gt 0 ]; then
        printf 'FAILED: %s\n' "${failed[@]}"
        return 1
    fi
}

case "$what" in
dp)
    # Two replicas split the GPU's 0.9 share (0.45 each); the target is aggregate tok/s >= one engine.
    # 2048 requests: with 512 a run lasts 4 s and start-up and the last requests' tail dominate it.
    for replicas in 1 2; do
        timeout 150 python -m octavo.entrypoints.cli bench throughput --model dummy:qwen3-0.6b --workload fixed \
            --num-prompts 2048 --max-num-seqs 512 --skip-limit --gpu-memory-utilization 0.9 \
            --data-parallel-size "$replicas" --output "$out/dp$replicas-qwen3-fixed-2048.json"
    done
    python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for replicas in (1, 2):
    report = json.load(open(f"{out}/dp{replicas}-qwen3-fixed-2048.json"))
    result = next(r for r in report["engines"] if r["engine"] == "octavo")
    rows[replicas] = result
for replicas, result in rows.items():
    print(f"replicas {replicas}: {result['output_tok_s']:9.0f} output tok/s  {result['elapsed_s']:6.1f}s")
ratio = rows[2]["output_tok_s"] / rows[1]["output_tok_s"]
print(f"2 replicas / 1 engine: {ratio:.2f} (target >= 1.0)")
json.dump({"one_engine": rows[1], "two_replicas": rows[2], "ratio": ratio}, open(f"{out}/dp-summary.json", "w"), indent=1)
PY
    ;;
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
limit)
    bench_cmd=(python -m octavo.entrypoints.cli bench throughput)  # timeout runs commands, not functions
    stage "qwen3-0.6b fixed 512" 200 "${bench_cmd[@]}" --model dummy:qwen3-0.6b --workload fixed --num-prompts 512 \
        --max-num-seqs 512 --with-tokenizer --compare hf-static --peer-num-prompts 64 \
        --output "$out/qwen3-fixed-512.json"
    stage "qwen3-0.6b var 256" 100 "${bench_cmd[@]}" --model dummy:qwen3-0.6b --workload var --num-prompts 256 \
        --max-num-seqs 256 --with-tokenizer --output "$out/qwen3-var-256.json"
    stage "llama3-8b fixed 256" 180 "${bench_cmd[@]}" --model dummy:llama3-8b --workload fixed --num-prompts 256 \
        --max-num-seqs 256 --with-tokenizer --compare hf-static --peer-num-prompts 64 \
        --output "$out/llama3-8b-fixed-256.json"
    for n in ${PROFILE_SIZES:-64 256 512}; do
        stage "step profile, $n sequences" 75 sh -c "python -m octavo.benchmarks.step_profile --model \
            dummy:qwen3-0.6b --num-prompts $n --max-num-seqs $n > '$out/step-profile-$n.txt' 2>&1"
        tail -n 12 "$out/step-profile-$n.txt"
    done
    finish
    ;;
followup)
    bench_cmd=(python -m octavo.entrypoints.cli bench throughput)
    # The stages' timeouts add up to 6.5 minutes, inside one device call's 10.
    stage "structured, 256 requests" 110 python -m octavo.benchmarks.structured --model dummy:qwen3-0.6b \
        --num-prompts 256 --max-tokens 256 --output "$out/structured-256.json"
    for quantization in auto fp8 gptq; do
        stage "llama3-8b fixed 256, $quantization" 90 "${bench_cmd[@]}" --model dummy:llama3-8b --workload fixed \
            --num-prompts 256 --max-num-seqs 256 --quantization "$quantization" \
            --output "$out/llama3-8b-fixed-256-quant-$quantization.json"
    done
    finish
    ;;
mixtral)
    timeout 290 python -m octavo.entrypoints.cli bench throughput --model dummy:mixtral-8x7b --workload fixed \
        --num-prompts 256 --max-num-seqs 256 --compare hf-static --peer-num-prompts 64 \
        --gpu-memory-utilization 0.9 --output "$out/mixtral-8x7b-fixed-256.json"
    ;;
staging)
    # The first run compiles the kernels; a failure's whole report lands in the log.
    status=0
    for staging in 1 0; do
        for run in $(seq "${FORK_RUNS:-2}"); do
            echo "=== async fork test, staging $staging, run $run (at ${SECONDS}s)"
            OCTAVO_TEST_DEVICE=cuda OCTAVO_INPUT_STAGING=$staging timeout 90 python -m pytest -q -p no:cacheprovider \
                tests/test_async_scheduling.py -k fork >> "$out/fork-tests.log" 2>&1 || status=1
        done
    done
    grep -E "passed|failed" "$out/fork-tests.log" || true
    exit $status
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
serve)
    serve_check "$out"
    ;;
quant)
    formats=${QUANT_FORMATS:-auto fp8 gptq}
    stage "quantized-linear kernels on CUDA" 150 env OCTAVO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
        tests/test_quant_kernels.py
    stage "quantized layers against transformers" 90 env OCTAVO_TEST_DEVICE=cuda python -m pytest -q \
        -p no:cacheprovider tests/test_quantization.py \
        -k "weight_only and gptq-v1-asym-act-order or w8a8 and ct-fp8-channel-token"
    stage "decode micro-benchmark" 120 python -m octavo.benchmarks.quant_linear --output "$out/quant-linear.json"
    for quantization in $formats; do
        stage "llama3-8b fixed 256, $quantization" 90 python -m octavo.entrypoints.cli bench throughput \
            --model dummy:llama3-8b --workload fixed --num-prompts 256 --max-num-seqs 256 \
            --quantization "$quantization" --output "$out/llama3-8b-fixed-256-quant-$quantization.json"
    done
    python -m octavo.benchmarks.quant_linear --summarize $(for q in $formats; do
        echo "$out/llama3-8b-fixed-256-quant-$q.json"; done) || true
    finish
    ;;
structured)
    python -m octavo.benchmarks.structured --model dummy:qwen3-0.6b --num-prompts 256 --max-tokens 256 \
        --output "$out/structured-256.json"
    OCTAVO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_structured_output.py \
        tests/test_logits_controls.py tests/test_watermark.py
    ;;
hostcost)
    # Host ms against device ms per step at 64, 256 and 512 running sequences, then the throughput
    # they add up to (about 3.5 minutes).
    for n in 64 256 512; do
        python -m octavo.benchmarks.step_profile --model dummy:qwen3-0.6b --num-prompts $n --max-num-seqs $n \
            | tee "$out/step-profile-$n.txt"
        echo "hostcost: $n sequences done at ${SECONDS}s"
    done
    bench --model dummy:qwen3-0.6b --workload fixed --num-prompts 512 --max-num-seqs 512 \
        --output "$out/qwen3-fixed-512.json"
    ;;
tp)
    # No NVLink multicast in any process (the workers inherit it too).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    status=0
    bench --model dummy:qwen3-0.6b --workload fixed --num-prompts 512 --max-num-seqs 512 \
        --output "$out/tp1-qwen3-fixed-512.json" || status=1
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -ge 2 ]; then
        for model in qwen3-0.6b llama3-8b; do
            # Eager as well where the graph run fails: it tells a graph-capture problem from a sharding one.
            timeout 240 python scripts/tp_equality.py --model "$model" --tensor-parallel-size 2 \
                --output "$out/tp2-equality-$model.json" || { status=1; timeout 240 python scripts/tp_equality.py \
                --model "$model" --tensor-parallel-size 2 --enforce-eager \
                --output "$out/tp2-equality-$model-eager.json" || true; }
        done
        for size in 1 2; do
            bench --model dummy:llama3-8b --workload fixed --num-prompts 256 --max-num-seqs 256 \
                --tensor-parallel-size "$size" --output "$out/tp$size-llama3-8b-fixed-256.json" || status=1
        done
    else
        echo "tp: one GPU visible; the TP=2 checks need two (nvidia-h200-x2)"
    fi
    exit $status
    ;;
*)
    echo "unknown mode $what: use kernels, engine, qwen3, llama3, limit, followup, mixtral, staging, moe, families, serve, quant, structured, hostcost, dp or tp" >&2
    exit 2
    ;;
esac
