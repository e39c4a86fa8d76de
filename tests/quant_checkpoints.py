"""Tiny quantized checkpoints, packed from the formats' published descriptions, with their
dequantized float32 reference models.

Each format builder takes one float weight [out, in] and returns the checkpoint tensors of that
layer plus the weight they decode to. The packers here are written from the format
descriptions (AutoGPTQ, AutoAWQ, compressed-tensors), word by word, independently of octavo's
vectorised unpacking, so a layout mistake on either side shows up as a mismatch.
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from tests.conftest import build_tiny_model

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble j of a word holds column AWQ_ORDER[j]
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "c_attn", "c_proj", "c_fc",  # GPT-2 and GPT-BigCode
                 "qkv_proj", "gate_up_proj",  # Phi-3, stored fused
                 "out_proj", "fc_in", "fc_out", "dense", "fc1", "fc2",  # GPT-J, Phi-2
                 "query_key_value", "dense_h_to_4h", "dense_4h_to_h")  # Falcon, BLOOM


def pack_words(values: np.ndarray, bits: int, order: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """Pack unsigned ``values`` [rows, cols] along the columns: value ``order[j]`` of each run
    goes to bits ``[bits * j, bits * (j + 1))`` of its int32 word."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    rows, cols = values.shape
    words = np.zeros((rows, cols // per_word), dtype=np.uint32)
    for word in range(cols // per_word):
        for j in range(per_word):
            words[:, word] |= values[:, word * per_word + order[j]].astype(np.uint32) << np.uint32(bits * j)
    return torch.from_numpy(words.view(np.int32).copy())


def default_g_idx(in_features: int, group_size: int) -> np.ndarray:
    return np.arange(in_features) // group_size


def act_order_g_idx(in_features: int, group_size: int, seed: int) -> np.ndarray:
    """GPTQ act-order: rows are quantized in a permuted order, group i takes the i-th run of rows."""
    perm = np.random.default_rng(seed).permutation(in_features)
    g_idx = np.empty(in_features, dtype=np.int64)
    g_idx[perm] = np.arange(in_features) // group_size
    return g_idx


def int_quantize(weight: torch.Tensor, bits: int, g_idx: np.ndarray, symmetric: bool):
    """Min/max integer quantization per (row, group): unsigned q [out, in], scale and zero [out, groups]."""
    w = weight.double().numpy()
    levels = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    scale = np.zeros((w.shape[0], groups))
    zero = np.zeros((w.shape[0], groups), dtype=np.int64)
    q = np.zeros(w.shape, dtype=np.int64)
    for g in range(groups):
        cols = g_idx == g
        block = w[:, cols]
        if symmetric:
            s = np.abs(block).max(axis=1) / (levels // 2)
            z = np.full(w.shape[0], (levels + 1) // 2)
        else:
            lo, hi = np.minimum(block.min(axis=1), 0), np.maximum(block.max(axis=1), 0)
            s = (hi - lo) / levels
            z = np.clip(np.round(-lo / s), 0, levels).astype(np.int64)
        scale[:, g], zero[:, g] = s, z
        q[:, cols] = np.clip(np.round(block / s[:, None]) + z[:, None], 0, levels)
    return q, scale, zero


def int_dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, g_idx: np.ndarray,
                   scale_dtype: torch.dtype) -> torch.Tensor:
    """``(q - zero) * scale`` with the scale as the checkpoint stores it (e.g. float16)."""
    scale = torch.from_numpy(scale).to(scale_dtype).double().numpy()
    return torch.from_numpy((q - zero[:, g_idx]) * scale[:, g_idx]).float()


# --- format builders: float weight [out, in] -> (checkpoint tensors, dequantized weight) -------

def gptq_linear(weight: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True,
                v2: bool = False, act_order: bool = False, seed: int = 0):
    """AutoGPTQ: qweight [in / pack, out] packed along in; qzeros [groups, out / pack] packed
    along out, holding zero - 1 in v1 and the zero in v2; scales [groups, out] float16; g_idx [in]."""
    in_features = weight.shape[1]
    g_idx = act_order_g_idx(in_features, group_size, seed) if act_order else default_g_idx(in_features, group_size)
    q, scale, zero = int_quantize(weight, bits, g_idx, symmetric)
    stored_zero = zero if v2 else (zero - 1) & ((1 << bits) - 1)
    tensors = {
        "qweight": pack_words(q, bits).t().contiguous(),
        "qzeros": pack_words(stored_zero.T, bits),
        "scales": torch.from_numpy(scale.T.copy()).half(),
        "g_idx": torch.from_numpy(g_idx).int(),
    }
    return tensors, int_dequantize(q, scale, zero, g_idx, torch.float16)


def awq_linear(weight: torch.Tensor, group_size: int = 32):
    """AutoAWQ GEMM: qweight [in, out / 8] and qzeros [groups, out / 8] packed along out in
    AWQ_ORDER; scales [groups, out] float16."""
    g_idx = default_g_idx(weight.shape[1], group_size)
    q, scale, zero = int_quantize(weight, 4, g_idx, symmetric=False)
    tensors = {
        "qweight": pack_words(q.T, 4, AWQ_ORDER),
        "qzeros": pack_words(zero.T, 4, AWQ_ORDER),
        "scales": torch.from_numpy(scale.T.copy()).half(),
    }
    return tensors, int_dequantize(q, scale, zero, g_idx, torch.float16)


def ct_packed_linear(weight: torch.Tensor, bits: int = 4, group_size: Optional[int] = 32, symmetric: bool = True,
                     act_order: bool = False, seed: int = 0):
    """compressed-tensors pack-quantized: weight_packed [out, in / pack] packed along in,
    weight_scale [out, groups], weight_zero_point [out / pack, groups] packed along out; values
    are signed and stored plus 2**(bits-1)."""
    in_features = weight.shape[1]
    size = group_size or in_features
    g_idx = act_order_g_idx(in_features, size, seed) if act_order else default_g_idx(in_features, size)
    q, scale, zero = int_quantize(weight, bits, g_idx, symmetric)
    tensors = {
        "weight_packed": pack_words(q, bits),
        "weight_scale": torch.from_numpy(scale.copy()).to(torch.bfloat16),
        "weight_shape": torch.tensor(list(weight.shape)),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack_words(zero.T, bits).t().contiguous()
    if act_order:
        tensors["weight_g_idx"] = torch.from_numpy(g_idx).int()
    return tensors, int_dequantize(q, scale, zero, g_idx, torch.bfloat16)


def ct_int8_weight_linear(weight: torch.Tensor):
    """compressed-tensors int-quantized, 8-bit channel weights: ``weight`` int8, ``weight_scale`` [out, 1]."""
    g_idx = default_g_idx(weight.shape[1], weight.shape[1])
    q, scale, zero = int_quantize(weight, 8, g_idx, symmetric=True)
    tensors = {"weight": torch.from_numpy(q - 128).to(torch.int8),
               "weight_scale": torch.from_numpy(scale.copy()).float()}
    return tensors, int_dequantize(q, scale, zero, g_idx, torch.float32)


def fp8_linear(weight: torch.Tensor, per_channel: bool, input_scale: Optional[float] = None):
    """FP8 e4m3 weight with a scale per tensor ([] as vLLM's fp8 format) or per row ([out, 1])."""
    absmax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().max()
    scale = (absmax / FP8_MAX).float()
    values = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    tensors = {"weight": values, "weight_scale": scale.reshape(-1, 1) if per_channel else scale.reshape(())}
    if input_scale is not None:
        tensors["input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    return tensors, values.float() * scale


def int8_linear(weight: torch.Tensor):
    """compressed-tensors int-quantized W8A8: symmetric int8 ``weight``, ``weight_scale`` [out, 1]."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    values = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
    return {"weight": values, "weight_scale": scale.float()}, values.float() * scale


# --- models -----------------------------------------------------------------------------------

def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Checkpoint module name -> the projections a quantized checkpoint quantizes (not lm_head)."""
    return {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in _LINEAR_NAMES}


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2 stores [in, out]


def input_group_seed(name: str) -> int:
    """One seed per input: q/k/v (and gate/up) read the same activations, so act-order gives them
    the same permutation."""
    for shard, first in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        name = name.replace(shard, first)
    return zlib.crc32(name.encode())


def make_quantized_checkpoint(arch: str, folder: Path, builder: Callable, quantization_config: dict):
    """Save a tiny model of ``arch`` with every projection quantized by ``builder(name, weight)``;
    return the float32 HF model holding the dequantized weights (the reference)."""
    model = build_tiny_model(arch, folder)
    reference = copy.deepcopy(model)
    state = {name: tensor.clone().contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    ref_modules = linear_modules(reference)
    for name, module in linear_modules(model).items():
        weight = module.weight.detach()
        weight = weight.t() if _is_conv1d(module) else weight
        tensors, dequantized = builder(name, weight.contiguous())
        del state[f"{name}.weight"]
        if _is_conv1d(module) and "weight" in tensors:
            tensors["weight"] = tensors["weight"].t()  # stored in the module's own [in, out] layout
        state.update({f"{name}.{key}": value.contiguous() for key, value in tensors.items()})
        with torch.no_grad():
            ref_modules[name].weight.copy_(dequantized.t() if _is_conv1d(module) else dequantized)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    save_file(state, str(folder / "model.safetensors"))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config, indent=2))
    return reference.eval()


def fake_quantize_activations(model: torch.nn.Module, kind: str, static_scales: Optional[dict] = None) -> None:
    """Quantize-dequantize every projection's input as W8A8 does: ``fp8`` / ``int8`` per token, or
    with ``static_scales[module name]`` (one per tensor)."""
    qmax = FP8_MAX if kind == "fp8" else 127.0

    def hook_for(name):
        def hook(module, args):
            x = args[0].float()
            if static_scales is not None:
                scale = torch.tensor(static_scales[name])
            else:
                scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-12)
            y = x / scale
            y = y.clamp(-qmax, qmax).to(FP8).float() if kind == "fp8" else torch.round(y).clamp(-128, 127)
            return (y * scale,)
        return hook

    for name, module in linear_modules(model).items():
        module.register_forward_pre_hook(hook_for(name))


def calibrate_input_scales(model: torch.nn.Module, prompt: list[int], qmax: float) -> dict[str, float]:
    """Static activation scales: each projection's input absmax on one prompt, over qmax."""
    scales: dict[str, float] = {}
    handles = []
    for name, module in linear_modules(model).items():
        def hook(module, args, name=name):
            scales[name] = max(scales.get(name, 0.0), float(args[0].abs().max()) / qmax)
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.tensor([prompt]))
    for handle in handles:
        handle.remove()
    return scales
