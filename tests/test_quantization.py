"""Quantized checkpoints (GPTQ, AWQ, compressed-tensors, FP8) and online FP8 match the
dequantized model run in float32 by transformers: prompt logits and greedy tokens."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from tests.conftest import ARCHITECTURES, VOCAB_SIZE, build_tiny_model
from tests.quant_checkpoints import (
    FP8_MAX, awq_linear, calibrate_input_scales, ct_int8_weight_linear, ct_packed_linear, fake_quantize_activations,
    fp8_linear, gptq_linear, input_group_seed, int8_linear, linear_modules, make_quantized_checkpoint, pack_words,
)
from tests.test_parity import MAX_NEW_TOKENS, engine_greedy, hf_greedy, make_llm, random_prompts


def gptq_config(bits=4, group_size=32, desc_act=False, sym=True, checkpoint_format="gptq"):
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": checkpoint_format, "lm_head": False}


def ct_config(fmt, weights, input_activations=None):
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": weights, "input_activations": input_activations}}}


def int_weights(bits, strategy, group_size=None, symmetric=True, actorder=None):
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": False, "actorder": actorder}


FP8_CHANNEL = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
FP8_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

# name -> (builder(name, weight), quantization_config, activation quantization of the reference)
WEIGHT_ONLY = {
    "gptq-v1-sym": (lambda n, w: gptq_linear(w), gptq_config()),
    "gptq-v2-asym": (lambda n, w: gptq_linear(w, symmetric=False, v2=True),
                     gptq_config(sym=False, checkpoint_format="gptq_v2")),
    "gptq-v1-asym-act-order": (lambda n, w: gptq_linear(w, symmetric=False, act_order=True, seed=input_group_seed(n)),
                               gptq_config(sym=False, desc_act=True)),
    "gptq-8bit-g64": (lambda n, w: gptq_linear(w, bits=8, group_size=64), gptq_config(bits=8, group_size=64)),
    "awq": (lambda n, w: awq_linear(w), {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                         "version": "gemm"}),
    "ct-w4a16-sym-group": (lambda n, w: ct_packed_linear(w), ct_config("pack-quantized", int_weights(4, "group", 32))),
    "ct-w4a16-asym-act-order": (
        lambda n, w: ct_packed_linear(w, symmetric=False, act_order=True, seed=input_group_seed(n)),
        ct_config("pack-quantized", int_weights(4, "group", 32, symmetric=False, actorder="group"))),
    "ct-w4a16-channel": (lambda n, w: ct_packed_linear(w, group_size=None),
                         ct_config("pack-quantized", int_weights(4, "channel"))),
    "ct-w8a16-channel": (lambda n, w: ct_int8_weight_linear(w), ct_config("int-quantized", int_weights(8, "channel"))),
    "ct-fp8-w8a16": (lambda n, w: fp8_linear(w, per_channel=True), ct_config("float-quantized", FP8_CHANNEL)),
}
W8A8 = {
    "fp8-dynamic": (lambda n, w: fp8_linear(w, per_channel=False),
                    {"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
    "ct-fp8-channel-token": (lambda n, w: fp8_linear(w, per_channel=True),
                             ct_config("float-quantized", FP8_CHANNEL, FP8_TOKEN), "fp8"),
    "ct-int8-channel-token": (lambda n, w: int8_linear(w),
                              ct_config("int-quantized", int_weights(8, "channel"), INT8_TOKEN), "int8"),
}


def assert_matches_reference(folder, reference, atol: float, quantized_activations: bool = False,
                             **llm_options) -> None:
    """Full-vocabulary prompt log-probabilities within ``atol`` (on average, for quantized
    activations), and the same greedy tokens.

    With quantized activations a last-bit difference in a layer's input can move one value to
    the next FP8 step (1/16 apart); the reference itself moves by up to 0.06 when its embeddings
    change by one part in a million. So those cases bound the mean difference, and the largest
    by what one such step can do."""
    llm = make_llm(folder, **llm_options)
    prompts = random_prompts()
    from octavo import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=VOCAB_SIZE)
    output = llm.generate({"prompt_token_ids": prompts[1]}, params, use_tqdm=False)[0]
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([prompts[1]])).logits[0].float(), dim=-1)
    got = torch.stack([torch.tensor([output.prompt_logprobs[p][t].logprob for t in range(VOCAB_SIZE)])
                       for p in range(1, len(prompts[1]))])
    difference = (got - expected[:-1]).abs()
    if quantized_activations:
        assert float(difference.mean()) < atol and float(difference.max()) < 0.25, (difference.mean(), difference.max())
    else:
        assert float(difference.max()) < atol, difference.max()
    got = engine_greedy(llm, prompts)
    expected = [hf_greedy(reference, p, MAX_NEW_TOKENS) for p in prompts]
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    logprob_difference = max(abs(a - b) for (_, ours), (_, theirs) in zip(got, expected) for a, b in zip(ours, theirs))
    assert logprob_difference < (0.25 if quantized_activations else atol), logprob_difference


@pytest.mark.parametrize("case", WEIGHT_ONLY)
def test_weight_only_checkpoint_matches_dequantized_reference(case, tmp_path):
    builder, quantization_config = WEIGHT_ONLY[case]
    reference = make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    assert_matches_reference(tmp_path, reference, atol=1e-4)


@pytest.mark.parametrize("case", W8A8)
def test_w8a8_checkpoint_matches_reference_with_quantized_activations(case, tmp_path):
    builder, quantization_config, activations = W8A8[case]
    reference = make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    fake_quantize_activations(reference, activations)
    assert_matches_reference(tmp_path, reference, atol=5e-3, quantized_activations=True)


def test_fp8_static_input_scales(tmp_path):
    """vLLM's fp8 format with per-tensor weight and input scales (q/k/v calibrated on the same input)."""
    scales = calibrate_input_scales(build_tiny_model("llama", tmp_path / "float"), random_prompts()[1], FP8_MAX)
    reference = make_quantized_checkpoint(
        "llama", tmp_path / "fp8", lambda n, w: fp8_linear(w, per_channel=False, input_scale=scales[n]),
        {"quant_method": "fp8", "activation_scheme": "static"})
    fake_quantize_activations(reference, "fp8", static_scales=scales)
    assert_matches_reference(tmp_path / "fp8", reference, atol=5e-3, quantized_activations=True)


# Checkpoint formats load for these; the others refuse a quantized checkpoint by name (below).
QUANTIZED_ARCHITECTURES = ["mistral", "qwen2", "qwen3", "gpt2", "gemma", "gemma2", "aquila", "gptj", "phi"]
REFUSED_ARCHITECTURES = {
    "mixtral": "not supported for mixture-of-experts", "qwen2_moe": "not supported for mixture-of-experts",
    "qwen3_moe": "not supported for mixture-of-experts",
    # q/k/v (and gate/up) stored as one quantized tensor
    "phi3": "must be stored shard by shard", "gpt_bigcode": "must be stored shard by shard",
    "gpt_bigcode_mha": "must be stored shard by shard", "falcon": "must be stored shard by shard",
    "falcon_old": "must be stored shard by shard", "falcon_rw": "must be stored shard by shard",
    "bloom": "must be stored shard by shard",
}


def test_every_architecture_is_either_quantized_or_refused():
    assert sorted(["llama", *QUANTIZED_ARCHITECTURES, *REFUSED_ARCHITECTURES]) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", QUANTIZED_ARCHITECTURES)
def test_every_architecture_loads_gptq_act_order(arch, tmp_path):
    builder, quantization_config = WEIGHT_ONLY["gptq-v1-asym-act-order"]
    reference = make_quantized_checkpoint(arch, tmp_path, builder, quantization_config)
    assert_matches_reference(tmp_path, reference, atol=1e-4)


@pytest.mark.parametrize("arch", REFUSED_ARCHITECTURES)
def test_unsupported_quantized_architectures_are_refused_by_name(arch, tmp_path):
    builder, quantization_config = WEIGHT_ONLY["gptq-v1-sym"]
    make_quantized_checkpoint(arch, tmp_path, builder, quantization_config)
    with pytest.raises(ValueError, match=REFUSED_ARCHITECTURES[arch]):
        make_llm(tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_every_architecture_loads_fp8(arch, tmp_path):
    builder, quantization_config, activations = W8A8["ct-fp8-channel-token"]
    reference = make_quantized_checkpoint(arch, tmp_path, builder, quantization_config)
    fake_quantize_activations(reference, activations)
    assert_matches_reference(tmp_path, reference, atol=5e-3, quantized_activations=True)


@pytest.mark.parametrize("arch", ["llama", "phi3", "falcon", "bloom", "gptj"])
def test_online_fp8_quantizes_each_row(arch, tmp_path):
    """``quantization="fp8"`` on a float checkpoint: per-row e4m3 weights, per-token activations;
    fused q/k/v stored whole (Phi-3, Falcon's grouped and BLOOM's per-head rows) split by rows."""
    model = build_tiny_model(arch, tmp_path)
    with torch.no_grad():
        for module in linear_modules(model).values():
            _, dequantized = fp8_linear(module.weight, per_channel=True)
            module.weight.copy_(dequantized)
    fake_quantize_activations(model, "fp8")
    assert_matches_reference(tmp_path, model, atol=5e-3, quantized_activations=True, quantization="fp8")
    if arch != "llama":
        return
    layer = make_llm(tmp_path, quantization="fp8").llm_engine.core.model.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.qkv_proj.weight_scale.shape == (64 + 32 + 32,)


def test_lm_head_and_embeddings_stay_in_checkpoint_precision(tmp_path):
    builder, quantization_config = WEIGHT_ONLY["gptq-v1-sym"]
    make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    model = make_llm(tmp_path).llm_engine.core.model
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.gate_up_proj.qweight.dtype == torch.int32


def test_compressed_tensors_unpacker_reads_our_packing():
    """The test packer agrees with compressed-tensors' reference unpacker (weights and zero points)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    tensors, _ = ct_packed_linear(weight, group_size=16, symmetric=False)
    from tests.quant_checkpoints import default_g_idx, int_quantize

    q, _, zero = int_quantize(weight, 4, default_g_idx(64, 16), symmetric=False)
    unpacked = helpers.unpack_from_int32(tensors["weight_packed"], 4, torch.Size([48, 64]))
    assert torch.equal(unpacked, torch.from_numpy(q - 8).to(torch.int8))
    zero_points = helpers.unpack_from_int32(tensors["weight_zero_point"], 4, torch.Size([48, 4]), packed_dim=0)
    assert torch.equal(zero_points, torch.from_numpy(zero - 8).to(torch.int8))
    repacked = helpers.pack_to_int32(torch.from_numpy(q - 8).to(torch.int8), 4)
    assert torch.equal(repacked, tensors["weight_packed"])


@pytest.mark.parametrize("case", ["ct-w4a16-sym-group", "ct-w4a16-channel", "ct-fp8-w8a16", "ct-fp8-channel-token"])
def test_transformers_reads_the_checkpoints_as_the_reference_does(case, tmp_path):
    """transformers' own compressed-tensors loading (decompressing, and quantizing FP8 activations
    per token) gives the reference's logits: the packing and the activation rule are the format's."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    builder, quantization_config, *activations = {**WEIGHT_ONLY, **W8A8}[case]
    reference = make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    if activations:
        fake_quantize_activations(reference, activations[0])
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = torch.tensor([random_prompts()[1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, reference(prompt).logits, atol=1e-5, rtol=0)


def test_gptq_and_awq_layouts_decode_to_the_same_weight():
    """One quantized weight in both layouts: octavo's loaders reach the same kernel tensors."""
    from octavo.layers.linear import Linear
    from octavo.layers.quantization.awq import AWQConfig
    from octavo.layers.quantization.gptq import GPTQConfig

    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    awq_tensors, awq_weight = awq_linear(weight)
    gptq_tensors, gptq_weight = gptq_linear(weight, symmetric=False, v2=True)
    torch.testing.assert_close(awq_weight, gptq_weight, atol=0, rtol=0)
    layers = []
    for config, tensors in ((AWQConfig(32, []), awq_tensors),
                            (GPTQConfig(4, 32, False, False, True, False, []), gptq_tensors)):
        layer = Linear(128, 64, bias=False, quant_config=config, prefix="model.layers.0.mlp.down_proj")
        for name, tensor in tensors.items():
            if name != "g_idx":
                layer.load_shard("", name, tensor)
        layer.process_after_loading()
        layers.append(layer)
    assert torch.equal(layers[0].qweight, layers[1].qweight) and torch.equal(layers[0].zeros, layers[1].zeros)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layers[0](x), x @ gptq_weight.t(), atol=1e-4, rtol=1e-4)


# --- errors -------------------------------------------------------------------------------

def test_unsupported_method_names_it_and_the_supported_ones(tmp_path):
    build_tiny_model("llama", tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'bitsandbytes'.*supported methods: awq, compressed-tensors, fp8, gptq"):
        make_llm(tmp_path)


def test_unsupported_compressed_tensors_scheme_is_named(tmp_path):
    nvfp4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
    build_tiny_model("llama", tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = ct_config("nvfp4-pack-quantized", nvfp4)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weights float 4-bit tensor_group.*Supported schemes: FP8 W8A8"):
        make_llm(tmp_path)


def test_quantization_option_is_checked(tmp_path):
    builder, quantization_config = WEIGHT_ONLY["gptq-v1-sym"]
    make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    with pytest.raises(ValueError, match=r"quantization='int3' is not supported; use auto .*gptq"):
        make_llm(tmp_path, quantization="int3")
    with pytest.raises(ValueError, match=r"quantization='awq' does not match .*'gptq'"):
        make_llm(tmp_path, quantization="awq")
    with pytest.raises(ValueError, match=r"quantization='none' cannot load it"):
        make_llm(tmp_path, quantization="none")
    assert engine_greedy(make_llm(tmp_path, quantization="gptq"), [[5, 6, 7]])


def test_format_option_needs_a_quantized_checkpoint(tmp_path):
    build_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match=r"quantization='gptq' needs a checkpoint quantized in that format"):
        make_llm(tmp_path, quantization="gptq")


def test_missing_quantized_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    builder, quantization_config = WEIGHT_ONLY["gptq-v1-sym"]
    make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.scales"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: model.layers.1.self_attn.k_proj.scales$"):
        make_llm(tmp_path)


def test_wrong_packed_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    builder, quantization_config = WEIGHT_ONLY["awq"]
    make_quantized_checkpoint("llama", tmp_path, builder, quantization_config)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.scales"] = state["model.layers.0.mlp.down_proj.scales"][:2]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.scales'.*shape \(2, 64\), expected \(4, 64\)"):
        make_llm(tmp_path)


def test_act_order_shards_with_different_permutations_are_refused(tmp_path):
    builder = lambda n, w: gptq_linear(w, act_order=True, seed=zlib.crc32(n.encode()))  # noqa: E731 - q/k/v differ
    make_quantized_checkpoint("llama", tmp_path, builder, gptq_config(desc_act=True))
    with pytest.raises(ValueError, match="different act-order permutations"):
        make_llm(tmp_path)


# --- dummy weights ----------------------------------------------------------------------

@pytest.mark.parametrize("quantization_config", [gptq_config(group_size=32), None], ids=["gptq", "online-fp8"])
def test_dummy_weights_in_quantized_formats(quantization_config, tmp_path):
    build_tiny_model("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    if quantization_config is not None:
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (tmp_path / "config.json").write_text(json.dumps(config))
    llm = make_llm(tmp_path, load_format="dummy", quantization="auto" if quantization_config else "fp8")
    outputs = engine_greedy(llm, random_prompts(2))
    assert all(len(tokens) == MAX_NEW_TOKENS for tokens, _ in outputs)
    down = llm.llm_engine.core.model.model.layers[0].mlp.down_proj
    weight = down.quant_method.dequantize(down, torch.float32)
    assert 0.01 < float(weight.std()) < 0.04  # realistic magnitudes, like the 16-bit dummy weights


def test_pack_words_layout():
    """Value j of a word sits at bits [4j, 4j + 4); AWQ's order interleaves the columns."""
    values = torch.arange(8).reshape(1, 8).numpy()
    assert pack_words(values, 4).item() == 0x76543210
    assert pack_words(values, 4, (0, 2, 4, 6, 1, 3, 5, 7)).item() == 0x75316420


def test_throughput_bench_reports_quantized_weight_bytes(tmp_path, capsys, monkeypatch):
    """The octavo row's limit uses the bytes of the weights it holds."""
    from octavo.benchmarks import roofline
    from octavo.entrypoints.cli import main

    ceilings = roofline.Ceilings(copy_bandwidth=1e11, matmul_flops=1e12, matmul_dtype="float32", approximate=True)
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device, dtype: ceilings)  # measuring takes seconds

    build_tiny_model("llama", tmp_path / "model")
    output = tmp_path / "results.json"
    status = main(["bench", "throughput", "--model", str(tmp_path / "model"), "--workload", "fixed",
                   "--num-prompts", "2", "--prompt-len-range", "5", "9", "--output-len-range", "4", "4",
                   "--device", "cpu", "--quantization", "fp8", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    octavo = report["engines"][-1]
    full_bytes = report["limit"]["model_shape"]["weight_bytes"]  # float32 here
    assert octavo["quantization"] == "fp8" and octavo["weight_bytes"] < full_bytes / 2
    assert octavo["bound_output_tok_s"] > report["limit"]["bound"]["output_tok_s"]
    assert "weights 0.00 GB (quantization fp8)" in capsys.readouterr().out
    from octavo.benchmarks.quant_linear import summarize_throughput

    summary = summarize_throughput([str(output), str(output)])
    assert "fp8" in summary and "1.00x" in summary


def test_quantization_reaches_the_core_process(tmp_path):
    """``quantization`` travels to a core in its own process (the default on CUDA) with the config."""
    build_tiny_model("llama", tmp_path)
    in_process = make_llm(tmp_path, quantization="fp8")
    across = make_llm(tmp_path, quantization="fp8", engine_core_process=True)
    assert across.llm_engine.core is None
    info = across.llm_engine.core_client.info
    assert info.weight_bytes == in_process.llm_engine.core_client.info.weight_bytes
    assert info.weight_bytes < make_llm(tmp_path).llm_engine.core_client.info.weight_bytes / 2
    prompts = random_prompts(3)
    assert engine_greedy(across, prompts) == engine_greedy(in_process, prompts)
    across.shutdown()
