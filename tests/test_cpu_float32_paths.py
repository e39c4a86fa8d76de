"""The float32 CPU fast paths against their references: the packed linears (the AVX-512 GEMM,
oneDNN, MKL) against ``F.linear``, the fused RMSNorm / SiLU kernels against the PyTorch operators, and whole
engines with the fast paths on against the reference paths (``OCTAVO_CPU_ONEDNN_LINEAR=0``,
``OCTAVO_CPU_PAGED_DECODE=0``, ``OCTAVO_CPU_FUSED_OPS=0``) and transformers."""

from __future__ import annotations

import random
from typing import Optional

import pytest
import torch

from octavo.layers import cpu_fused, cpu_gemm, cpu_linear
from octavo.layers.attention import cpu_paged
from octavo.layers.cpu_linear import PrepackedLinearMethod, onednn_linear_available, prepack_cpu_linears, use_onednn
from octavo.layers.linear import Linear, MergedLinear

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch has no oneDNN linear")


def _count_forms(monkeypatch) -> tuple[dict[str, list[int]], list[int]]:
    """Count the calls into each packed form: each call records ``current[0]`` (the caller's
    row count; MKL's input is padded to 64 rows)."""
    took: dict[str, list[int]] = {"gemm": [], "onednn": [], "mkl": []}
    current = [0]

    def counting(name, function):
        def wrapper(*args, **kwargs):
            took[name].append(current[0])
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cpu_gemm, "linear", counting("gemm", cpu_gemm.linear))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting("onednn", torch.ops.mkldnn._linear_pointwise))
    if cpu_linear.mkl_packed_available():
        monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", counting("mkl", torch.ops.mkl._mkl_linear))
    return took, current


needs_gemm = pytest.mark.skipif(not cpu_gemm.load_gemm(), reason="the AVX-512 GEMM does not build here")


@needs_onednn
@pytest.mark.parametrize("gemm", ["1", "0"])
@pytest.mark.parametrize("shape", [(64, {"": 96}, False), (48, {"gate": 200, "up": 200}, True), (32, {"": 512}, True)])
def test_prepacked_linear_matches_f_linear(shape, gemm, monkeypatch):
    """Every row count through whichever packed form takes it (MKL for 57..64, the AVX-512 GEMM
    or oneDNN below and above) gives F.linear's rows."""
    if gemm == "1" and not cpu_gemm.load_gemm():
        pytest.skip("the AVX-512 GEMM does not build here")
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, gemm)
    in_features, shards, bias = shape
    torch.manual_seed(0)
    layer = MergedLinear(in_features, shards, bias=bias) if len(shards) > 1 else Linear(in_features, shards[""], bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.1)
        if bias:
            layer.bias.normal_()
    inputs = {rows: torch.randn(rows, in_features) for rows in (1, 2, 7, 8, 33, 48, 49, 57, 60, 64, 65, 100, 128,
                                                                129, 300, 513)}
    want = {rows: torch.nn.functional.linear(x, layer.weight, layer.bias) for rows, x in inputs.items()}
    assert prepack_cpu_linears(torch.nn.Sequential(layer)) == 1
    assert isinstance(layer.quant_method, PrepackedLinearMethod)
    assert hasattr(layer, "gemm_weight") == (gemm == "1") and hasattr(layer, "onednn_weight") == (gemm == "0")
    # 57..64 rows through MKL's packed GEMM where torch has it (fewer than 64 padded)
    assert (getattr(layer, "mkl_weight", None) is not None) == cpu_linear.mkl_packed_enabled()
    assert [rows for rows in inputs if cpu_linear.use_mkl_packed(rows)] == [57, 60, 64]
    took, current = _count_forms(monkeypatch)
    for rows, x in inputs.items():
        current[0] = rows
        torch.testing.assert_close(layer(x), want[rows], atol=1e-5, rtol=1e-5)
    mkl_rows = [57, 60, 64] if cpu_linear.mkl_packed_enabled() else []
    assert took["mkl"] == mkl_rows
    if gemm == "1":
        assert took["gemm"] == [rows for rows in inputs if 2 <= rows <= 512 and rows not in mkl_rows]
        assert took["onednn"] == []
    else:
        assert took["gemm"] == []
        assert took["onednn"] == [rows for rows in inputs if rows not in mkl_rows
                                  and use_onednn(rows, layer.out_features, layer.in_features)]
        assert {2, 8, 48} <= set(took["onednn"])
    # a non-contiguous input (a slice of a wider activation) gives the same rows
    wide = torch.randn(8, 2 * in_features)
    torch.testing.assert_close(layer(wide[:, :in_features]),
                               torch.nn.functional.linear(wide[:, :in_features], layer.weight, layer.bias),
                               atol=1e-5, rtol=1e-5)


@needs_gemm
@pytest.mark.parametrize("out_features", [1, 17, 32, 50, 96])
@pytest.mark.parametrize("in_features", [0, 1, 7, 130, 1536])
def test_gemm_kernel_matches_f_linear(out_features, in_features):
    """Every row-tile size (1..12 rows, and tiles of 12 then the rest), outputs that end inside a
    32-column block or inside its first vector, odd input widths, a bias, strided rows."""
    torch.manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features)
    packed = cpu_gemm.pack(weight)
    assert packed.shape == ((out_features + 31) // 32, in_features, 32)
    for rows in list(range(0, 14)) + [24, 25, 37, 64, 131]:
        x = torch.randn(rows, in_features)
        for b in (None, bias):
            torch.testing.assert_close(cpu_gemm.linear(x, packed, out_features, b),
                                       torch.nn.functional.linear(x, weight, b), atol=1e-4, rtol=1e-5)
    if in_features == 1:  # one column with a row stride: torch calls it contiguous as it is
        column = torch.randn(1, 5).t()
        torch.testing.assert_close(cpu_gemm.linear(column, packed, out_features, bias),
                                   torch.nn.functional.linear(column, weight, bias), atol=1e-4, rtol=1e-5)
    wide = torch.randn(9, in_features + 5)[:, 3:3 + in_features]  # rows 5 floats apart from where they end
    torch.testing.assert_close(cpu_gemm.linear(wide, packed, out_features, bias),
                               torch.nn.functional.linear(wide, weight, bias), atol=1e-4, rtol=1e-5)


@needs_gemm
@pytest.mark.parametrize("out_features", [17, 96, 576])
def test_gemm_kernel_row_bands_match_f_linear(out_features):
    """Two threads (the suite may run on one): from 16 row tiles a band of rows per thread, and
    with fewer column blocks than threads more bands; every row of every band is computed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(out_features)
        weight, bias = torch.randn(out_features, 64), torch.randn(out_features)
        packed = cpu_gemm.pack(weight)
        for rows in (2, 13, 181, 200, 300):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(cpu_gemm.linear(x, packed, out_features, bias),
                                       torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_gemm
def test_gemm_kernel_refuses_mismatches():
    packed = cpu_gemm.pack(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="features"):
        cpu_gemm.linear(torch.randn(2, 15), packed, 40, None)
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_gemm.linear(torch.randn(2, 16), packed, 65, None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_gemm.linear(torch.randn(2, 16), packed, 40, torch.randn(39))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_gemm.linear(torch.randn(2, 16, dtype=torch.float64), packed, 40, None)


def test_mkl_packed_switch(monkeypatch):
    monkeypatch.setenv(cpu_linear.MKL_ENV_SWITCH, "0")
    layer = Linear(32, 64, bias=False)
    with torch.no_grad():
        layer.weight.normal_()  # the layer's weight starts uninitialized
    prepack_cpu_linears(torch.nn.Sequential(layer))
    assert getattr(layer, "mkl_weight", None) is None
    x = torch.randn(64, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), atol=1e-5, rtol=1e-5)


def test_row_bands():
    assert not use_onednn(1, 960, 576)
    assert use_onednn(2, 576, 1536) and use_onednn(48, 576, 576)
    assert not use_onednn(64, 960, 576) and use_onednn(64, 3072, 576) and use_onednn(64, 49152, 576)
    assert not use_onednn(129, 49152, 576)


needs_fused = pytest.mark.skipif(not cpu_fused.load_fused_ops(), reason="the fused CPU kernels do not build here")


@needs_fused
@pytest.mark.parametrize("hidden", [576, 100, 17])
def test_fused_rms_norm_and_silu_match_pytorch(hidden, monkeypatch):
    from octavo.layers.activation import SiluAndMul
    from octavo.layers.norm import RMSNorm

    torch.manual_seed(0)
    monkeypatch.setenv(cpu_fused.ENV_SWITCH, "0")
    norm, act = RMSNorm(hidden, eps=1e-5), SiluAndMul()
    monkeypatch.setenv(cpu_fused.ENV_SWITCH, "1")
    fused_norm, fused_act = RMSNorm(hidden, eps=1e-5), SiluAndMul()
    assert fused_norm.cpu_fused and fused_act.cpu_fused and not norm.cpu_fused and not act.cpu_fused
    with torch.no_grad():
        norm.weight.normal_()
        fused_norm.weight.copy_(norm.weight)
    for rows in (1, 3, 8, 64, 300):
        wide = torch.randn(rows, 2 * hidden) * 3  # a strided view: rows of a wider activation
        x, residual = wide[:, :hidden], torch.randn(rows, hidden)
        gate_up = torch.randn(rows, 2 * hidden) * 4
        with torch.inference_mode():
            want_plain, (want_out, want_sum), want_act = norm(x), norm(x, residual), act(gate_up)
            assert cpu_fused.use_fused(x)
            got_plain, (got_out, got_sum), got_act = fused_norm(x), fused_norm(x, residual), fused_act(gate_up)
        torch.testing.assert_close(got_plain, want_plain, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got_out, want_out, rtol=2e-6, atol=2e-6)
        assert torch.equal(got_sum, want_sum)  # the residual sum is one float32 add either way
        torch.testing.assert_close(got_act, want_act, rtol=2e-6, atol=1e-6)
        assert x.equal(wide[:, :hidden])  # inputs untouched
    with torch.inference_mode():  # the PyTorch form where the kernels do not apply
        assert not cpu_fused.use_fused(torch.randn(4, hidden, dtype=torch.bfloat16))
        assert not cpu_fused.use_fused(torch.randn(2, 4, hidden))
    assert cpu_fused.use_fused(torch.randn(4, hidden)) is False  # autograd on: the PyTorch form


def _engine_tokens(folder, monkeypatch, onednn: str, paged: str, prompts, fused: Optional[str] = None,
                   **overrides):
    from octavo import LLM, SamplingParams

    monkeypatch.setenv(cpu_linear.ENV_SWITCH, onednn)
    monkeypatch.setenv("OCTAVO_CPU_PAGED_DECODE", paged)
    monkeypatch.setenv(cpu_fused.ENV_SWITCH, fused if fused is not None else onednn)
    kwargs = dict(device="cpu", dtype="float32", max_model_len=96, block_size=4, max_num_seqs=8,
                  max_num_batched_tokens=40, num_gpu_blocks_override=80)
    kwargs.update(overrides)
    llm = LLM(str(folder), **kwargs)
    runner = llm.llm_engine.core.runner
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.quant_method, PrepackedLinearMethod) == (onednn == "1") for m in linears)
    # On with the switch wherever the kernel builds, off without it.
    assert runner.backend.paged_decode == (paged == "1" and cpu_paged.load_paged_decode())
    llm.llm_engine.core.kv_cache.pool.shuffle_free_queue(random.Random(1))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [next(iter(step.values())).logprob for step in o.outputs[0].logprobs])
            for o in outputs]


@needs_onednn
@pytest.mark.parametrize("arch, gemm", [("llama", "1"), ("qwen2", "1"), ("llama", "0")])
def test_engine_fast_paths_match_the_reference_and_hf(arch, gemm, tiny_model_factory, monkeypatch):
    """Eight prompts (decode steps of 2..8 rows through the packed linears, the AVX-512 GEMM or,
    as on CPUs without AVX-512, oneDNN; the paged decode kernel; mixed steps with prompt chunks):
    the same greedy tokens and logprobs as the reference paths, and transformers' tokens."""
    from tests.test_parity import hf_greedy

    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, gemm)

    folder, model = tiny_model_factory(arch)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))] for _ in range(8)]
    reference = _engine_tokens(folder, monkeypatch, "0", "0", prompts)
    fast = _engine_tokens(folder, monkeypatch, "1", "1", prompts)
    assert [tokens for tokens, _ in fast] == [tokens for tokens, _ in reference]
    for (_, got), (_, want) in zip(fast, reference):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [tokens for tokens, _ in fast] == [hf_greedy(model, p, 12)[0] for p in prompts]


@pytest.mark.parametrize("tokens", [1, 8, 37])
def test_joint_rotary_is_the_per_tensor_rotary_exactly(tokens):
    from transformers import LlamaConfig

    from octavo.layers.rotary import RotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128, rope_theta=10000.0)
    rope = RotaryEmbedding(config, 16, 128)
    positions = torch.randint(0, 128, (tokens,))
    q, k = torch.randn(tokens, 6, 16), torch.randn(tokens, 2, 16)
    assert rope.can_rotate_joint(q, 16)
    want_q, want_k = rope(positions, q, k)
    per_step: dict = {}
    joint = rope.rotate_joint(positions, torch.cat([q, k], dim=1), per_step)
    assert torch.equal(joint[:, :6], want_q) and torch.equal(joint[:, 6:], want_k)
    assert per_step and rope.rotate_joint(positions, torch.cat([q, k], dim=1), per_step).equal(joint)  # cached


def test_cpu_greedy_ids_are_argmax_with_ties():
    from octavo.worker.sampler import greedy_ids

    logits = torch.randn(16, 1000)
    logits[3, [5, 700]] = 50.0  # a tie: the first index wins, as with argmax
    logits[7, :] = 1.0
    assert torch.equal(greedy_ids(logits), logits.argmax(dim=-1))
    assert greedy_ids(logits)[3] == 5 and greedy_ids(logits)[7] == 0


def test_linear_benchmark_checks_and_times_every_form(capsys):
    from octavo.benchmarks import cpu_linear as bench

    bench.main(["--rows", "1", "5", "64", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
                "--head-dim", "16", "--layers", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "F.linear" in out and [line.split()[0] for line in out.splitlines()[2:]] == ["1", "5", "64"]
    if cpu_gemm.load_gemm():
        assert "AVX-512 GEMM" in out


@needs_onednn
def test_packed_copies_are_kept_only_as_far_as_they_fit(monkeypatch):
    """Each copy of this layer is 64 KiB; half the available memory holds two, one or none."""
    def prepacked(available: int) -> Linear:
        monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: available)
        layer = Linear(128, 128, bias=False)
        with torch.no_grad():
            layer.weight.normal_()  # the layer's weight starts uninitialized
        prepack_cpu_linears(torch.nn.Sequential(layer))
        return layer

    roomy = prepacked(1 << 30)
    assert isinstance(roomy.quant_method, PrepackedLinearMethod)
    assert hasattr(roomy, "mkl_weight") == cpu_linear.mkl_packed_enabled()
    if cpu_linear.mkl_packed_enabled():
        one = prepacked(3 * 64 << 10)  # room for one copy: MKL's band goes first
        assert isinstance(one.quant_method, PrepackedLinearMethod) and not hasattr(one, "mkl_weight")
        assert hasattr(one, "gemm_weight") or hasattr(one, "onednn_weight")
    tight = prepacked(64 << 10)
    assert not isinstance(tight.quant_method, PrepackedLinearMethod)  # the plain weight alone
    x = torch.randn(8, 128)
    torch.testing.assert_close(tight(x), torch.nn.functional.linear(x, tight.weight))
