"""Quantized-linear kernels against the dequantized reference.

On CPU the Triton kernels run in the interpreter on small shapes (float16/float32); with
``OCTAVO_TEST_DEVICE=cuda`` the layer tests sweep the token count from 1 to 8192 on the GPU,
through both the fused W4A16 kernel (decode) and dequantize-then-matmul (prefill).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from octavo.layers.linear import Linear, MergedLinear
from octavo.layers.quantization.base import QuantizationConfig
from octavo.layers.quantization.fp8 import Fp8LinearMethod, quantize_rows_fp8
from octavo.layers.quantization.int8 import Int8LinearMethod, quantize_rows_int8
from octavo.layers.quantization.packing import pack_int32, unpack_int32
from octavo.layers.quantization.gptq import GPTQLinearMethod
from octavo.layers.quantization.wna16 import FUSED_MAX_TOKENS

DEVICE = torch.device(os.environ.get("OCTAVO_TEST_DEVICE", "cpu"))
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs OCTAVO_TEST_DEVICE=cuda")
GPU_TOKENS = [1, 2, 3, 4, 7, 8, 16, 17, 31, 32, 48, 64, 100, 128, 200, 256, 512, FUSED_MAX_TOKENS,
              FUSED_MAX_TOKENS + 1, 2048, 4096, 8192]


def random_wna16(in_features, out_features, bits, group_size, with_zeros, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (in_features, out_features), generator=generator, dtype=torch.int32)
    groups = in_features // group_size
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.002).to(dtype)
    zeros = (torch.randint(0, 1 << bits, (groups, out_features), generator=generator, dtype=torch.int32)
             .to(torch.uint8) if with_zeros else None)
    zero_values = zeros.int() if with_zeros else torch.full((groups, out_features), 1 << (bits - 1))
    weight = ((values - zero_values.repeat_interleave(group_size, 0)).double()
              * scales.double().repeat_interleave(group_size, 0))
    qweight = pack_int32(values, bits, dim=0)
    return (qweight.to(device), scales.to(device), None if zeros is None else zeros.to(device), weight.to(device))


def test_pack_and_unpack_are_inverse():
    values = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    for dim in (0, 1):
        packed = pack_int32(values if dim == 0 else values.t().contiguous(), 4, dim)
        assert torch.equal(unpack_int32(packed, 4, dim), values if dim == 0 else values.t())
    assert pack_int32(torch.full((8, 1), 15), 4, 0).item() == -1  # all bits set: the int32 -1


# --- Triton, interpreted on CPU (small shapes) and compiled on CUDA ----------------------

@pytest.mark.parametrize("bits,group_size,with_zeros", [(4, 32, True), (4, 64, False), (8, 32, True), (4, 128, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_wna16_gemm_matches_dequantized_matmul(bits, group_size, with_zeros, dtype, tokens):
    from octavo.layers.quantization import triton_kernels

    qweight, scales, zeros, weight = random_wna16(128, 96, bits, group_size, with_zeros, dtype, DEVICE)
    x = torch.randn(tokens, 128, device=DEVICE).to(dtype)
    expected = x.double() @ weight.to(dtype).double()  # the kernel widens the weight to x's dtype
    out = triton_kernels.wna16_gemm(x, qweight, scales, zeros, group_size, bits)
    assert out.dtype == dtype and out.shape == (tokens, 96)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tolerance * float(expected.abs().max()), rtol=0)


def test_wna16_gemm_split_k_tile_shapes_and_word_loads_agree():
    from octavo.layers.quantization import triton_kernels

    qweight, scales, zeros, weight = random_wna16(256, 80, 4, 64, True, torch.float32, DEVICE)  # ragged N
    x = torch.randn(3, 256, device=DEVICE)
    expected = x.double() @ weight
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, gather words, swap A and B); BLOCK_M < BLOCK_K
    # scales after the dot, the others before it
    for config, split in [((16, 32, 32, 4, 2, False, False), 4), ((16, 64, 64, 4, 2, True, False), 2),
                          ((32, 32, 16, 4, 2, False, False), 1), ((16, 32, 64, 4, 2, True, False), 1),
                          ((16, 32, 64, 4, 2, False, True), 2), ((16, 64, 32, 4, 2, True, True), 1),
                          ((32, 32, 16, 4, 2, False, True), 4), ((32, 16, 32, 4, 2, True, True), 1)]:
        out = triton_kernels.wna16_gemm(x, qweight, scales, zeros, 64, 4, config=config, split_k=split)
        torch.testing.assert_close(out.double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0,
                                   msg=lambda text: f"config {config}, split {split}: {text}")


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 4), (torch.float16, 8), (torch.bfloat16, 4),
                                        (torch.float32, 4), (torch.float32, 8)])
def test_magic_bits_hold_every_value_exactly(dtype, bits):
    """The kernel turns unpacked values into floats by OR-ing them into a power of two's mantissa
    and subtracting the zero point built the same way; every value must come out exact."""
    from octavo.layers.quantization import triton_kernels

    magic = triton_kernels.magic_bits(dtype, bits)
    values = torch.arange(1 << bits, dtype=torch.int32)
    as_bits = torch.int16 if dtype.itemsize == 2 else torch.int32
    floats = (values | magic).to(as_bits).view(dtype)
    # every value against every zero point (the checkpoints' zeros are values of the same width)
    assert torch.equal((floats[:, None] - floats[None, :]).double(), (values[:, None] - values[None, :]).double())
    assert triton_kernels.magic_bits(torch.bfloat16, 8) == 0  # 8-bit values overflow its 7-bit mantissa


def test_wna16_gemm_without_the_mantissa_trick(monkeypatch):
    """Where no power of two holds the values (8-bit in bfloat16), the kernel converts instead."""
    from octavo.layers.quantization import triton_kernels

    monkeypatch.setattr(triton_kernels, "magic_bits", lambda dtype, bits: 0)
    qweight, scales, zeros, weight = random_wna16(128, 64, 8, 32, True, torch.float16, DEVICE)
    x = torch.randn(5, 128, device=DEVICE).to(torch.float16)
    expected = x.double() @ weight.to(torch.float16).double()
    for config in [(16, 32, 32, 4, 2, False, False), (16, 32, 32, 4, 2, True, True), (32, 32, 16, 4, 2, False, True)]:
        out = triton_kernels.wna16_gemm(x, qweight, scales, zeros, 32, 8, config=config, split_k=1)
        torch.testing.assert_close(out.double(), expected, atol=2e-3 * float(expected.abs().max()), rtol=0)


def test_every_wna16_tile_candidate_compiles_for_hopper():
    """The tuner's candidates through Triton's real compiler for sm_90 (the interpreter accepts code
    the compiler refuses, and on a GPU the tuner would skip such a candidate, silently slower);
    with the mantissa trick, no int-to-float conversion is left in the 4-bit kernels."""
    from octavo.layers.quantization import triton_kernels

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_for_hopper.py"
    result = subprocess.run([sys.executable, str(script), "--dtype", "bf16", "--bits", "4", "8"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * sum(len(configs) for configs in triton_kernels._CANDIDATES.values())
    assert all("conversions 0" in line for line in lines if " 4-bit " in line), result.stdout
    assert any(": wgmma," in line for line in lines) and any(": mma," in line for line in lines)


@pytest.mark.parametrize("with_zeros", [True, False])
def test_wna16_matmul_paths_agree(with_zeros):
    """Both paths the tuner chooses between (the fused kernel, or unpacking then one matmul) give
    the dequantized product; below DEQUANTIZE_MIN_TOKENS only the fused kernel is a candidate."""
    from octavo.layers.quantization import triton_kernels

    qweight, scales, zeros, weight = random_wna16(128, 64, 4, 32, with_zeros, torch.float32, DEVICE)
    x = torch.randn(40, 128, device=DEVICE)
    expected = x.double() @ weight
    for paths in [("fused",), ("dequantize",), ("fused", "dequantize")]:
        out = triton_kernels.wna16_matmul(x, qweight, scales, zeros, 32, 4, paths)
        torch.testing.assert_close(out.double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="unknown W4A16 paths"):
        triton_kernels.wna16_matmul(x, qweight, scales, zeros, 32, 4, ("dequant",))
    with pytest.raises(ValueError, match="must divide the group size"):
        triton_kernels.wna16_gemm(x, qweight, scales, zeros, 32, 4, config=(16, 32, 64, 4, 2, False, False))
    few = triton_kernels._configs(triton_kernels.DEQUANTIZE_MIN_TOKENS - 1, 32, 128, 4, ("fused", "dequantize"))
    many = triton_kernels._configs(triton_kernels.DEQUANTIZE_MIN_TOKENS, 32, 128, 4, ("fused", "dequantize"))
    assert triton_kernels.DEQUANTIZE not in few and many[-1] == triton_kernels.DEQUANTIZE
    assert triton_kernels._configs(1, 32, 128, 4, ("dequantize",)) == [triton_kernels.DEQUANTIZE]


@pytest.mark.parametrize("bits,with_zeros", [(4, True), (4, False), (8, True)])
def test_wna16_dequantize_kernel_is_exact(bits, with_zeros):
    from octavo.layers.quantization import triton_kernels

    qweight, scales, zeros, weight = random_wna16(128, 80, bits, 32, with_zeros, torch.float16, DEVICE)
    out = triton_kernels.wna16_dequantize(qweight, scales, zeros, 32, bits, torch.float16)
    assert torch.equal(out, weight.to(torch.float16))


def test_tuned_choices_are_kept_per_graph_batch_size_then_per_power_of_two():
    from octavo.layers.quantization.triton_kernels import _tuning_tokens

    assert [_tuning_tokens(n) for n in (1, 16, 17, 240, 241, 256)] == [16, 16, 32, 240, 256, 256]
    assert [_tuning_tokens(n) for n in (257, 512, 513, 1024)] == [512, 512, 1024, 1024]


def test_int8_activation_kernel_matches_reference():
    from octavo.layers.quantization import triton_kernels

    x = torch.randn(7, 200, device=DEVICE) * torch.logspace(-3, 2, 7, device=DEVICE)[:, None]
    x[3] = 0.0  # an all-zero row keeps a finite scale
    values, scales = triton_kernels.quantize_rows_int8(x)
    expected_values, expected_scales = quantize_rows_int8(x)
    assert torch.equal(values, expected_values) and torch.equal(scales, expected_scales)


@cuda_only  # the interpreter converts to float8 wrongly just below powers of two (e.g. 127 -> 64)
def test_fp8_activation_kernel_matches_reference():
    from octavo.layers.quantization import triton_kernels

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(9, 4096, device=DEVICE) * torch.logspace(-3, 2, 9, device=DEVICE)[:, None]).to(dtype)
        values, scales = triton_kernels.quantize_rows_fp8(x)
        expected_values, expected_scales = quantize_rows_fp8(x)
        assert torch.equal(scales, expected_scales)
        assert torch.equal(values.float(), expected_values.float())


# --- layers: every method against its dequantized weight ---------------------------------

class _Config(QuantizationConfig):
    """One method for every layer (the formats' configs choose per layer name)."""

    name = "test"

    def __init__(self, method):
        self.method = method

    @classmethod
    def from_config(cls, config):
        raise NotImplementedError

    def linear_method(self, prefix):
        return self.method


def _layer(method, in_features, shard_sizes, dtype, device):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return MergedLinear(in_features, shard_sizes, bias=True, quant_config=_Config(method))
    finally:
        torch.set_default_dtype(previous)


def _fill(layer, seed=0):
    generator = torch.Generator(device=layer.bias.device).manual_seed(seed)
    with torch.no_grad():
        layer.init_dummy(generator)
        layer.bias.normal_(0.0, 0.1, generator=generator)
    layer.process_after_loading()


def test_fp8_layer_matches_reference_on_quantized_activations():
    layer = _layer(Fp8LinearMethod(), 64, {"q": 32, "k": 16, "v": 16}, torch.float32, DEVICE)
    _fill(layer)
    x = torch.randn(5, 64, device=DEVICE)
    x_q, x_scale = quantize_rows_fp8(x)
    expected = (x_q.float() * x_scale) @ layer.quant_method.dequantize(layer, torch.float32).t() + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_int8_layer_matches_reference_on_quantized_activations():
    layer = _layer(Int8LinearMethod(static_activations=False), 64, {"gate": 48, "up": 48}, torch.float32, DEVICE)
    _fill(layer)
    x = torch.randn(20, 64, device=DEVICE)
    x_q, x_scale = quantize_rows_int8(x)
    expected = (x_q.float() * x_scale) @ layer.quant_method.dequantize(layer, torch.float32).t() + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_static_input_scale_is_the_shard_maximum():
    layer = _layer(Fp8LinearMethod(static_activations=True), 64, {"q": 32, "k": 16, "v": 16}, torch.float32, DEVICE)
    for shard, value in zip("qkv", (0.01, 0.03, 0.02)):
        layer.load_shard(shard, "input_scale", torch.tensor(value))
    layer.process_after_loading()
    assert float(layer.input_scale) == pytest.approx(0.03)


@cuda_only
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_tuner_candidate_on_gpu(bits, dtype):
    """Each candidate the tuner may pick, compiled for this GPU, against the dequantized product:
    random zero points, a ragged last column tile, split K where the grid is small."""
    from triton.runtime.errors import OutOfResources

    from octavo.layers.quantization import triton_kernels

    qweight, scales, zeros, weight = random_wna16(512, 200, bits, 128, True, dtype, DEVICE)
    checked = 0
    for bucket in triton_kernels._CANDIDATES:
        tokens = min(bucket, 300)
        x = torch.randn(tokens, 512, device=DEVICE, dtype=dtype)
        expected = x.double() @ weight.double()
        for config in triton_kernels._configs(tokens, 128, 512, bits, ("fused",)):
            for split in (1, 2):
                try:
                    out = triton_kernels.wna16_gemm(x, qweight, scales, zeros, 128, bits, config=config, split_k=split)
                except OutOfResources:
                    continue  # the tuner skips it the same way
                torch.testing.assert_close(out.double(), expected, atol=1e-2 * float(expected.abs().max()), rtol=0,
                                           msg=lambda text: f"config {config}, split {split}: {text}")
                checked += 1
    assert checked >= 30


@cuda_only
def test_pretune_fills_every_token_count_at_load():
    from octavo.layers.quantization import triton_kernels

    qweight, scales, zeros, _ = random_wna16(512, 256, 4, 128, True, torch.bfloat16, DEVICE)
    triton_kernels.pretune(qweight, scales, zeros, 128, 4, torch.bfloat16, 1024)
    tuned = {key[0] for key in triton_kernels._TUNED if key[1:3] == (256, 512) and key[6] == torch.bfloat16}
    assert tuned >= set(range(16, 257, 16)) | {512, 1024}


@cuda_only
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_w4a16_layer_on_gpu_across_token_counts(tokens, dtype):
    """GPTQ layout, group 128, at a Llama-like width: fused kernel up to FUSED_MAX_TOKENS,
    dequantize-then-cuBLAS above."""
    method = GPTQLinearMethod(4, 128, symmetric=False, act_order=False, zeros_v2=True)
    layer = _layer(method, 4096, {"gate": 1536, "up": 1536}, dtype, DEVICE)
    _fill(layer)
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=dtype)
    expected = (x.double() @ method.dequantize(layer, dtype).double() + layer.bias.double())
    out = layer(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.double(), expected, atol=1e-2 * scale, rtol=0)


@cuda_only
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_w8a8_layer_on_gpu_across_token_counts(tokens, method):
    quant = Fp8LinearMethod() if method == "fp8" else Int8LinearMethod(static_activations=False)
    quantize = quantize_rows_fp8 if method == "fp8" else quantize_rows_int8
    layer = _layer(quant, 4096, {"q": 2048, "k": 512, "v": 512}, torch.bfloat16, DEVICE)
    _fill(layer)
    x = torch.randn(tokens, 4096, device=DEVICE, dtype=torch.bfloat16)
    x_q, x_scale = quantize(x)
    expected = ((x_q.double() * x_scale.double()) @ quant.dequantize(layer, torch.float32).double().t()
                + layer.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-2 * float(expected.abs().max()), rtol=0)


def test_layer_without_quantization_is_a_plain_linear():
    layer = Linear(16, 8, bias=True)
    assert layer.weight.shape == (8, 16) and layer.bias.shape == (8,)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_the_tuner_skips_configs_that_do_not_fit_the_gpu():
    """A tile whose pipeline needs more shared memory than the card has (H200: 227 KiB) is
    skipped while timing candidates, not fatal; none fitting is a clear error."""
    from triton.runtime.errors import OutOfResources

    from octavo.layers.quantization.triton_kernels import fastest_config

    times = {(128, 256, 64, 8, 3, False, False): None, (64, 128, 64, 4, 4, False, False): 2.0,
             (128, 128, 64, 8, 3, False, False): 1.5, "dequantize": 1.7}

    def time_config(config):
        if times[config] is None:
            raise OutOfResources(241664, 232448, "shared memory")
        return times[config]

    assert fastest_config(list(times), time_config) == (128, 128, 64, 8, 3, False, False)
    times["dequantize"] = 1.2
    assert fastest_config(list(times), time_config) == "dequantize"
    with pytest.raises(RuntimeError, match="no W4A16 kernel config fits"):
        fastest_config([(128, 256, 64, 8, 3, False, False)], time_config)
