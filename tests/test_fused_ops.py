"""Fused elementwise Triton kernels against the PyTorch reference layers.

Without CUDA the kernels run in the Triton interpreter on tiny shapes, in fp32 and fp16 (the
interpreter truncates when it converts to bf16, so bf16 is checked on CUDA only). On CUDA the
same checks run in bf16 too, plus the layers' dispatch to the kernels.
"""

import contextlib
import importlib
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from octavo.layers import fused_ops
from octavo.layers.activation import SiluAndMul
from octavo.layers.norm import RMSNorm
from octavo.layers.rotary import RotaryEmbedding

# Imported before the interpreter was switched on: rebuild the kernels as interpreted ones.
if not torch.cuda.is_available() and isinstance(fused_ops._rms_norm_kernel,
                                                triton.runtime.JITFunction):
    fused_ops = importlib.reload(fused_ops)

# The interpreter's numpy exp overflows to inf on saturated silu inputs, as the GPU's does.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]
# rtol of two roundings of the dtype: the kernels and the reference may round an intermediate
# (or, for silu_and_mul, the result) differently.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2 ** -9, "atol": 1e-4},
    torch.bfloat16: {"rtol": 2 ** -6, "atol": 1e-3},
}
EPS = 1e-6


@pytest.fixture(autouse=True)
def reset_switch():
    yield
    fused_ops.set_enabled(None)


@contextlib.contextmanager
def reference():
    """The layers take the PyTorch path inside, also on CUDA."""
    fused_ops.set_enabled(False)
    try:
        yield
    finally:
        fused_ops.set_enabled(None)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[expected.dtype])


def mostly_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Where kernel and reference round the same values only fp32 noise can flip a rounding."""
    if expected.dtype != torch.float32:
        assert (actual == expected).float().mean().item() > 0.9


def make_norm(hidden: int, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(hidden, eps=EPS)
    gen = torch.Generator().manual_seed(seed)
    norm.weight.data = 1.0 + 0.5 * torch.randn(hidden, generator=gen)
    return norm.to(device=DEVICE, dtype=dtype)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (3, 576), (7, 100)])
def test_rms_norm(rows, hidden, dtype):
    norm = make_norm(hidden, dtype)
    x = randn(rows, hidden, dtype=dtype, seed=1, scale=3.0)
    x_before = x.clone()
    out = fused_ops.rms_norm(x, norm.weight, EPS)
    with reference():
        expected = norm(x)
    close(out, expected)
    mostly_exact(out, expected)
    assert torch.equal(x, x_before)
    assert not torch.allclose(out.float(), x.float(), atol=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 576)])
def test_fused_add_rms_norm(rows, hidden, dtype):
    norm = make_norm(hidden, dtype)
    x = randn(rows, hidden, dtype=dtype, seed=2)
    residual = randn(rows, hidden, dtype=dtype, seed=3, scale=4.0)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)
    with reference():
        expected, expected_residual = norm(x, residual)
    # The sum is one rounding of the input dtype in both: exact.
    assert torch.equal(new_residual, expected_residual)
    close(out, expected)
    mostly_exact(out, expected)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    assert not torch.allclose(new_residual.float(), residual.float(), atol=0.1)


def test_rms_norm_strided_rows_and_fp32_weight():
    # Rows of a wider buffer, and a weight that widens the result (the reference promotes).
    dtype = torch.float16
    buffer = randn(4, 200, dtype=dtype, seed=4)
    x = buffer[:, 8:136]
    norm = make_norm(128, torch.float32)
    out = fused_ops.rms_norm(x, norm.weight, EPS)
    with reference():
        expected = norm(x)
    assert out.dtype == torch.float32
    close(out, expected)


# ---------------------------------------------------------------------------------------------
# Rotary embedding and Qwen3's qk-norm + rotary
# ---------------------------------------------------------------------------------------------

MAX_POS = 128


def split_qkv(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, seed: int):
    """q and k as llama.py makes them: strided views of one fused qkv projection output."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=seed, scale=2.0)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(num_tokens, num_q_heads, head_dim)
    k = k.reshape(num_tokens, num_kv_heads, head_dim)
    if num_tokens > 1:  # a size-1 dim has no meaningful stride
        assert q.stride(0) == k.stride(0) == q_size + 2 * kv_size
    return qkv, q, k


def make_rope(head_dim: int, partial: float) -> RotaryEmbedding:
    config = SimpleNamespace(rope_theta=10000.0, partial_rotary_factor=partial)
    return RotaryEmbedding(config, head_dim, MAX_POS).to(DEVICE)


def positions_for(num_tokens: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    # Out of order, repeated and at both ends of the table.
    values = [MAX_POS - 1, 0, 37, 5, 37, 100, 64][:num_tokens]
    return torch.tensor(values, dtype=dtype, device=DEVICE)


ROPE_CASES = [
    # tokens, q heads, kv heads, head_dim, partial rotary factor
    (1, 2, 1, 64, 1.0),
    (5, 4, 2, 128, 1.0),
    (3, 3, 1, 32, 1.0),
    (4, 4, 2, 128, 0.5),
    (2, 2, 2, 96, 0.25),  # head_dim not a power of two, rotary_dim 24
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,head_dim,partial", ROPE_CASES)
def test_rotary(tokens, hq, hkv, head_dim, partial, dtype):
    rope = make_rope(head_dim, partial)
    qkv, q, k = split_qkv(tokens, hq, hkv, head_dim, dtype, seed=5)
    qkv_before = qkv.clone()
    positions = positions_for(tokens)
    q_out, k_out = fused_ops.rotary(positions, q, k, rope.cos_sin_cache, rope.rotary_dim)
    with reference():
        q_ref, k_ref = rope(positions, q, k)
    close(q_out, q_ref)
    close(k_out, k_ref)
    mostly_exact(q_out, q_ref)
    assert torch.equal(qkv, qkv_before)
    rot = rope.rotary_dim
    if rot < head_dim:  # partial rotary: the rest passes through untouched
        assert torch.equal(q_out[..., rot:], q[..., rot:])
        assert torch.equal(k_out[..., rot:], k[..., rot:])
    moved = positions != 0
    rotated, original = q_out[moved][..., :rot].float(), q[moved][..., :rot].float()
    assert not torch.allclose(rotated, original, atol=1e-2)


def test_rotary_int32_positions():
    rope = make_rope(64, 1.0)
    _, q, k = split_qkv(5, 4, 2, 64, torch.float32, seed=6)
    q_out, k_out = fused_ops.rotary(positions_for(5, torch.int32), q, k, rope.cos_sin_cache,
                                    rope.rotary_dim)
    with reference():
        q_ref, k_ref = rope(positions_for(5), q, k)
    close(q_out, q_ref)
    close(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,head_dim,partial", ROPE_CASES)
def test_qk_norm_rope(tokens, hq, hkv, head_dim, partial, dtype):
    rope = make_rope(head_dim, partial)
    q_norm, k_norm = make_norm(head_dim, dtype, seed=7), make_norm(head_dim, dtype, seed=8)
    qkv, q, k = split_qkv(tokens, hq, hkv, head_dim, dtype, seed=9)
    qkv_before = qkv.clone()
    positions = positions_for(tokens)
    q_out, k_out = fused_ops.qk_norm_rope(positions, q, k, q_norm.weight, k_norm.weight, EPS,
                                          rope.cos_sin_cache, rope.rotary_dim)
    with reference():
        q_ref, k_ref = rope(positions, q_norm(q), k_norm(k))
        k_rope_only = rope(positions, q, k)[1]
    close(q_out, q_ref)
    close(k_out, k_ref)
    mostly_exact(q_out, q_ref)
    mostly_exact(k_out, k_ref)
    assert torch.equal(qkv, qkv_before)
    assert not torch.allclose(k_out.float(), k_rope_only.float(), atol=1e-2)  # the norm did happen


# ---------------------------------------------------------------------------------------------
# SiLU and multiply
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 64), (5, 96), (3, 1500)])
def test_silu_and_mul(rows, inter, dtype):
    x = randn(rows, 2 * inter, dtype=dtype, seed=10, scale=3.0)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0], dtype=dtype)  # saturated exp, both ways
    out = fused_ops.silu_and_mul(x)
    with reference():
        expected = SiluAndMul()(x)
    assert out.shape == (rows, inter) and out.is_contiguous()
    assert torch.isfinite(out).all()
    close(out, expected)
    assert not torch.allclose(out.float(), x[:, :inter].float(), atol=0.1)
    assert not torch.allclose(out.float(), x[:, inter:].float(), atol=0.1)


def test_empty_batches():
    norm = make_norm(64, torch.float32)
    empty = torch.empty(0, 64, device=DEVICE)
    assert fused_ops.rms_norm(empty, norm.weight, EPS).shape == (0, 64)
    assert fused_ops.fused_add_rms_norm(empty, empty, norm.weight, EPS)[0].shape == (0, 64)
    assert fused_ops.silu_and_mul(empty).shape == (0, 32)
    rope = make_rope(32, 1.0)
    _, q, k = split_qkv(0, 2, 1, 32, torch.float32, seed=0)
    q_out, k_out = fused_ops.rotary(positions_for(0), q, k, rope.cos_sin_cache, rope.rotary_dim)
    assert q_out.shape == (0, 2, 32) and k_out.shape == (0, 1, 32)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_switch_follows_environment(monkeypatch):
    monkeypatch.setenv("OCTAVO_DISABLE_FUSED_OPS", "1")
    fused_ops.set_enabled(None)
    assert not fused_ops.enabled()
    monkeypatch.setenv("OCTAVO_DISABLE_FUSED_OPS", "0")
    fused_ops.set_enabled(None)
    assert fused_ops.enabled()
    fused_ops.set_enabled(False)
    assert not fused_ops.enabled()


def _forbid_kernels(monkeypatch, calls: list):
    for name in ("rms_norm", "fused_add_rms_norm", "rotary", "qk_norm_rope", "silu_and_mul"):
        original = getattr(fused_ops, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused_ops, name, spy)


def test_cpu_tensors_take_the_reference_path(monkeypatch):
    calls: list = []
    _forbid_kernels(monkeypatch, calls)
    fused_ops.set_enabled(True)
    norm = RMSNorm(64).to("cpu")
    x = torch.randn(3, 64)
    norm(x)
    norm(x, x.clone())
    SiluAndMul()(torch.randn(3, 64))
    config = SimpleNamespace(rope_theta=10000.0)
    rope = RotaryEmbedding(config, 32, 16).to("cpu")
    rope(torch.arange(3), torch.randn(3, 2, 32), torch.randn(3, 1, 32))
    assert calls == []


@pytest.mark.skipif(not CUDA, reason="dispatch to the kernels happens on CUDA only")
def test_cuda_layers_dispatch_to_kernels(monkeypatch):
    from transformers import Qwen3Config

    from octavo.models.llama import LlamaAttention

    calls: list = []
    _forbid_kernels(monkeypatch, calls)
    dtype = torch.bfloat16
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=MAX_POS)
    torch.manual_seed(0)
    rope = RotaryEmbedding(config, 32, MAX_POS).to(DEVICE)
    attention = LlamaAttention(config, 0, rope).to(device=DEVICE, dtype=dtype)
    rope.cos_sin_cache = rope.cos_sin_cache.float()  # the loader keeps the table in fp32
    for norm in (attention.q_norm, attention.k_norm):
        norm.weight.data.normal_(1.0, 0.5)
    _, q, k = split_qkv(5, 4, 2, 32, dtype, seed=11)
    positions = positions_for(5)
    norm = make_norm(64, dtype)
    x, residual = randn(5, 64, dtype=dtype, seed=12), randn(5, 64, dtype=dtype, seed=13)
    gate_up = randn(5, 128, dtype=dtype, seed=14)

    def run():
        return [*attention._qk_norm_rope(positions, q, k), *rope(positions, q, k), norm(x),
                *norm(x, residual), SiluAndMul()(gate_up)]

    fused = run()
    assert calls == ["qk_norm_rope", "rotary", "rms_norm", "fused_add_rms_norm", "silu_and_mul"]
    with reference():
        expected = run()
    assert len(calls) == 5
    for actual, ref in zip(fused, expected):
        close(actual, ref)
