"""``octavo bench throughput``: the workload recipe, the hardware-limit model, and a CPU end-to-end run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from octavo.benchmarks import roofline
from octavo.benchmarks.workloads import WORKLOADS, build_requests, dummy_config, warmup_requests

# The ceilings quoted for one H100 and the bounds they give (shared/BENCHMARKS.md).
H100 = roofline.Ceilings(copy_bandwidth=3.0e12, matmul_flops=700e12, matmul_dtype="bfloat16")
QUOTED_BOUNDS = {"fixed": 32_000, "var": 25_500}


def _recipe(n: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int):
    """The recipe exactly as written in BENCHMARKS.md."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt_len = rng.randint(*prompt)
        output_len = rng.randint(*output)
        out.append(([rng.randrange(10, min(vocab, 32000)) for _ in range(prompt_len)], output_len))
    return out


def test_standard_workloads_match_the_table():
    assert (WORKLOADS["fixed"].num_prompts, WORKLOADS["fixed"].prompt_len, WORKLOADS["fixed"].output_len) == (
        512, (100, 1024), (256, 256))
    assert (WORKLOADS["var"].num_prompts, WORKLOADS["var"].prompt_len, WORKLOADS["var"].output_len) == (
        256, (100, 1024), (100, 1024))


@pytest.mark.parametrize("name", ["fixed", "var"])
def test_requests_follow_the_recipe_and_are_deterministic(name):
    spec = WORKLOADS[name].with_overrides(num_prompts=24)
    requests = build_requests(spec, vocab_size=151936, seed=0)
    assert requests == build_requests(spec, vocab_size=151936, seed=0)
    expected = _recipe(24, spec.prompt_len, spec.output_len, 151936, 0)
    assert [(r.prompt_token_ids, r.output_len) for r in requests] == expected
    assert build_requests(spec, vocab_size=151936, seed=1) != requests
    if name == "fixed":
        assert {r.output_len for r in requests} == {256}
    # A small vocabulary bounds the ids.
    small = build_requests(spec.with_overrides(prompt_len=(5, 9)), vocab_size=256, seed=0)
    assert all(10 <= t < 256 for r in small for t in r.prompt_token_ids)


def test_warmup_requests_share_no_prefix_with_the_workload():
    requests = build_requests(WORKLOADS["fixed"].with_overrides(num_prompts=16), vocab_size=32000, seed=0)
    warm = warmup_requests(requests, vocab_size=32000, seed=0)
    assert len(warm) == 4 and all(w.output_len <= 8 for w in warm)
    assert {w.prompt_len for w in warm} >= {min(r.prompt_len for r in requests), max(r.prompt_len for r in requests)}
    starts = {tuple(r.prompt_token_ids[:16]) for r in requests}
    assert not any(tuple(w.prompt_token_ids[:16]) in starts for w in warm)


@pytest.mark.parametrize("workload", ["fixed", "var"])
def test_bound_reproduces_the_quoted_qwen3_figures(workload):
    shape = roofline.model_shape(dummy_config("qwen3-0.6b"), torch.bfloat16)
    assert shape.flop_params == shape.weight_bytes // 2 == 596_049_920  # tied lm_head counted once, as a matmul
    assert shape.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2
    requests = build_requests(WORKLOADS[workload], vocab_size=151936, seed=0)
    bound = roofline.throughput_bound(shape, [r.prompt_len for r in requests], [r.output_len for r in requests],
                                      H100)
    assert bound.output_tok_s == pytest.approx(QUOTED_BOUNDS[workload], rel=0.15)
    assert bound.output_tokens == sum(r.output_len for r in requests)
    assert bound.decode_steps == max(r.output_len for r in requests) - 1


def test_moe_bound_counts_only_the_experts_tokens_use():
    shape = roofline.model_shape(dummy_config("mixtral-8x7b"), torch.bfloat16)
    assert shape.weight_bytes == 2 * 46_702_792_704  # Mixtral-8x7B's parameter count
    assert (shape.num_experts, shape.experts_per_token) == (8, 2)
    expert = 3 * 4096 * 14336  # w1, w2, w3 of one expert
    assert shape.expert_params == 32 * 8 * expert
    dense = shape.flop_params - shape.expert_params
    assert shape.active_flop_params == dense + 32 * 2 * expert  # about 12.9B
    # One token reads its 2 experts per layer; 256 tokens read (nearly) all 8.
    assert shape.experts_touched(1) == pytest.approx(2)
    assert shape.experts_touched(2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert shape.decode_weight_bytes(1) == pytest.approx(shape.weight_bytes - 2 * 32 * 6 * expert)
    assert shape.decode_weight_bytes(256) == pytest.approx(shape.weight_bytes)
    dense_shape = roofline.model_shape(dummy_config("llama3-8b"), torch.bfloat16)
    assert dense_shape.num_experts == 0 and dense_shape.active_flop_params == dense_shape.flop_params
    assert dense_shape.decode_weight_bytes(1) == dense_shape.weight_bytes
    # A small batch of an MoE model reads fewer bytes per step than all weights.
    ceilings = roofline.Ceilings(copy_bandwidth=1e12, matmul_flops=1e15, matmul_dtype="bfloat16")
    one = roofline.throughput_bound(shape, [10], [3], ceilings)
    assert one.decode_seconds == pytest.approx(
        sum(shape.decode_weight_bytes(1) + shape.kv_bytes_per_token * (10 + step) for step in (1, 2)) / 1e12)


def test_bound_shrinks_the_batch_as_requests_finish():
    shape = roofline.ModelShape(weight_bytes=1000, flop_params=10, num_layers=1, num_heads=1, num_kv_heads=1,
                                head_dim=1, dtype_bytes=1)
    ceilings = roofline.Ceilings(copy_bandwidth=1.0, matmul_flops=1e12, matmul_dtype="float32")
    bound = roofline.throughput_bound(shape, [1, 1], [2, 3], ceilings)
    # Step 1: both run, contexts 2 + 2; step 2: one runs, context 3. KV is 2 bytes per token.
    assert bound.decode_seconds == pytest.approx((1000 + 2 * 4) + (1000 + 2 * 3))
    assert bound.memory_bound_steps == bound.decode_steps == 2


def test_ceilings_measure_on_cpu():
    ceilings = roofline.measure_ceilings(torch.device("cpu"), torch.float32, iters=2)
    assert ceilings.approximate and ceilings.copy_bandwidth > 0 and ceilings.matmul_flops > 0


def test_end_to_end_against_hf_peers(tiny_model_factory, tmp_path, capsys):
    from octavo.entrypoints.cli import main

    folder, _ = tiny_model_factory("llama")
    output = tmp_path / "results.json"
    status = main(["bench", "throughput", "--model", str(folder), "--workload", "fixed", "--num-prompts", "4",
                   "--prompt-len-range", "5", "20", "--output-len-range", "6", "6", "--compare", "hf-static,hf-cb",
                   "--device", "cpu", "--skip-limit", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    assert report["failed"] == {}
    assert report["workload"]["num_prompts"] == 4 and report["workload"]["output_tokens"] == 24
    assert report["meta"]["dtype"] == "float32" and "limit" not in report
    engines = {e["engine"]: e for e in report["engines"]}
    assert list(engines) == ["hf-static", "hf-cb", "octavo"]
    octavo = engines["octavo"]
    assert octavo["output_tokens"] == octavo["generated_tokens"] == 24
    assert octavo["prompt_tokens"] == report["workload"]["prompt_tokens"]
    for engine in engines.values():
        assert engine["output_tok_s"] > 0 and engine["total_tok_s"] > engine["output_tok_s"]
        assert engine["fraction_of_bound"] is None
    assert set(octavo["ratios"]) == {"hf-static", "hf-cb"}
    assert 0 < octavo["model_load_s"] <= octavo["engine_startup_s"]
    table = capsys.readouterr().out
    assert "vs hf-static" in table and "octavo" in table


def test_moe_model_runs_beside_hf_static_with_its_limit(tiny_model_factory, tmp_path, capsys):
    from octavo.entrypoints.cli import main

    folder, _ = tiny_model_factory("mixtral")
    output = tmp_path / "results.json"
    status = main(["bench", "throughput", "--model", str(folder), "--workload", "fixed", "--num-prompts", "3",
                   "--prompt-len-range", "5", "12", "--output-len-range", "4", "4", "--compare", "hf-static",
                   "--device", "cpu", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    assert [e["engine"] for e in report["engines"]] == ["hf-static", "octavo"] and report["failed"] == {}
    shape = report["limit"]["model_shape"]
    assert (shape["num_experts"], shape["experts_per_token"]) == (4, 2)
    assert shape["active_flop_params"] < shape["flop_params"]
    assert all(e["fraction_of_bound"] > 0 for e in report["engines"])


def test_hf_cb_refuses_mixed_output_lengths(tiny_model_factory, capsys):
    from octavo.entrypoints.cli import main

    folder, _ = tiny_model_factory("llama")
    status = main(["bench", "throughput", "--model", str(folder), "--workload", "var", "--num-prompts", "2",
                   "--compare", "hf-cb", "--device", "cpu", "--skip-limit"])
    assert status == 2 and "hf-cb" in capsys.readouterr().err


def test_host_overhead_runs_the_engine_with_a_stub_model(capsys):
    from octavo.benchmarks import host_overhead

    host_overhead.main(["--num-seqs", "8", "--prompt-len", "16", "--steps", "5", "--vocab-size", "256"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "8" and all(float(value) > 0 for value in row[1:])


def test_with_tokenizer_detokenizes_the_outputs(tiny_model_factory, tmp_path, capsys, monkeypatch):
    from octavo.entrypoints.cli import main
    from octavo.engine import output_processor

    folder, _ = tiny_model_factory("llama", with_tokenizer=True)
    texts: list[str] = []
    make_output = output_processor.OutputProcessor.make_output

    def recording(self, state):
        output = make_output(self, state)
        texts.extend(completion.text for completion in output.outputs if output.finished)
        return output

    monkeypatch.setattr(output_processor.OutputProcessor, "make_output", recording)
    output = tmp_path / "results.json"
    status = main(["bench", "throughput", "--model", str(folder), "--num-prompts", "3", "--prompt-len-range", "5",
                   "9", "--output-len-range", "4", "4", "--device", "cpu", "--skip-limit", "--with-tokenizer",
                   "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    assert report["meta"]["octavo_options"]["with_tokenizer"] is True and report["failed"] == {}
    assert len(texts) >= 3 and all(texts), texts  # the timed requests came back as text


def test_hf_peer_keeps_grouped_mm_for_moe_experts_through_generate(monkeypatch):
    """The HF peer's MoE experts stay on grouped_mm during decoding (on a GPU generate() switches
    them to batched_mm, which runs Mixtral-8x7B out of memory), with the same tokens."""
    import torch
    import transformers as tf

    from octavo.benchmarks import hf_peers

    config = tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, num_local_experts=4, vocab_size=100)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    hf_peers._keep_grouped_mm(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected)
    optimize_for_decode = getattr(model, "_optimize_model_for_decode", None)
    if optimize_for_decode is None:
        pytest.skip("this transformers has no decode-time switch of experts kernels")
    # What generate() does on a GPU: the decode switch leaves the peer's implementation alone.
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with optimize_for_decode():
        assert set(model.get_experts_implementation().values()) == {hf_peers._GROUPED_MM_EVERY_STEP}


def test_weight_bytes_counts_every_parameter_once(tiny_model_factory):
    """The sizing benchmark's total equals transformers' parameter bytes for the same model, and
    4-bit GPTQ shrinks the linears about fourfold (from their bfloat16 size)."""
    from octavo.benchmarks.weight_bytes import weight_bytes

    folder, model = tiny_model_factory("llama")
    parts = weight_bytes(str(folder), "auto", torch.float32)
    assert parts["total"] == sum(p.numel() * p.element_size() for p in model.parameters())
    bf16 = weight_bytes("dummy:llama3-8b", "auto")
    gptq = weight_bytes("dummy:llama3-8b", "gptq")
    assert gptq["embeddings"] == bf16["embeddings"] and gptq["lm_head"] == bf16["lm_head"]
    assert 3.5 < bf16["linears"] / gptq["linears"] < 4.0
