"""GGUF weights kept quantized on the CPU: Q4_0 / Q4_1 linears through torch's int4 CPU kernel.

A GGUF Q4_0 / Q4_1 block holds 32 weights of one row as 4-bit values ``q`` with an fp16 scale
``d`` (and, for Q4_1, an fp16 minimum ``m``): ``w = d * (q - 8)`` or ``w = d * q + m``. Both are
``w = (q - 8) * scale + zero``, what ``torch.ops.aten._weight_int4pack_mm_for_cpu`` computes
per group of 32 (its fast AVX-512 path takes bfloat16 activations, scales and zeros), so the
file's 4-bit values are used as they are and only the scale and zero are rounded to bfloat16.

That kernel reads 0.6 bytes per weight instead of float32's 4, which is what a decode step at
small batch sizes is bound by. For a step of many tokens a GEMM is faster than the kernel, so
where memory allows (``_copy_kind``) each layer also keeps its weight decoded for one:

- on CPUs with AMX's bfloat16 tiles (``amx_bf16``), decoded to bfloat16 in oneDNN's blocked
  layout (2 more bytes per weight), for steps of more than ``PACKED_MAX_ROWS_WITH_BFLOAT16``
  rows: the tiles multiply bfloat16 several times faster than the AVX-512 float32 GEMM, and the
  int4 kernel already rounds activations to bfloat16. ``OCTAVO_CPU_GGUF_BF16=0`` takes the
  float32 copy below instead;
- otherwise, where ``cpu_gemm``'s AVX-512 GEMM is built, decoded to float32 in that GEMM's
  layout (4 more bytes per weight) for steps of more than ``PACKED_MAX_ROWS_WITH_GEMM`` rows.

Without either, steps above ``PACKED_MAX_TOKENS`` rows decode the 4-bit values to float32 on the
fly, one layer at a time.

The output projection (GGUF's Q8_0 or Q6_K ``output`` / tied ``token_embd``) runs in bfloat16
beside them; the embedding lookup keeps its float32 rows.

``GGUFCpuLinearMethod`` follows the quantization interface (``create_weights`` / ``load`` /
``process_after_loading`` / ``apply`` on the layer); ``pack_gguf_linears`` is the adapter that
applies it to an already loaded model from the GGUF file's raw blocks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from octavo.layers import cpu_extension, cpu_gemm

logger = logging.getLogger(__name__)

GROUP_SIZE = 32  # weights per GGUF Q4_0 / Q4_1 block
# Steps of up to this many tokens (decode batches) use the packed kernel; longer ones (prompt
# chunks) a float32 GEMM over the weight decoded for the call: decoding costs the same at any
# row count and pays off only where the GEMM is long (measured on a 2-core AVX-512 machine:
# decoding per call at 32-row decode steps ran at 0.64x transformers' float32 speed).
PACKED_MAX_TOKENS = 128
# Where the AVX-512 float32 GEMM is built (``cpu_gemm``), a layer also holds its weight decoded to
# float32 in the GEMM's layout, and steps of more rows than this go there: at a few rows a step
# is bound by reading the weights (0.6 bytes each here against float32's 4), at more by
# arithmetic, where the GEMM is faster than the int4 kernel, and prompt chunks need no decoding.
# `python -m octavo.benchmarks.cpu_linear --threads 2` (the default model's 120 linears, 2-core
# AVX-512 machine), ms: int4 13.6 / 24.7 / 30.3 / 46.5 / 90.1 at 8 / 16 / 20 / 32 / 64 rows, the
# GEMM 18.7 / 25.1 / 27.3 / 35.6 / 57.4.
PACKED_MAX_ROWS_WITH_GEMM = 16
# With AMX, a layer holds its weight in bfloat16 instead (oneDNN's reordered layout) and steps of
# more rows than this go there. The same benchmark on a 2-core machine with AMX, ms: int4 4.8 /
# 13.5 / 18.9 / 24.6 / 46.5 / 89.4 at 1 / 8 / 9 / 16 / 32 / 64 rows, bfloat16 through oneDNN 12.8 /
# 13.1 / 13.1 / 13.9 / 16.3 / 19.9 (activations rounded and results widened included), and 83.3
# at 512 rows against the AVX-512 float32 GEMM's 368.1.
PACKED_MAX_ROWS_WITH_BFLOAT16 = 8
BFLOAT16_REORDER_ROWS = 16  # the row count oneDNN's layout of the bfloat16 copy is chosen for
BFLOAT16_ENV_SWITCH = "OCTAVO_CPU_GGUF_BF16"
COPY_MAX_SHARE = 0.25  # of the memory available at load, at most, for the decoded copy
COPY_BYTES = {"float32": 4, "bfloat16": 2}  # per weight
GGUF_WEIGHT_MODES = ("auto", "packed", "float32")

_int4pack_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_int4pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)


def packed_kernels_available() -> bool:
    return _int4pack_mm is not None and _int4pack is not None


def decode_q4_blocks(raw: torch.Tensor, ggml_type_name: str, rows: int, cols: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor's raw bytes -> (q uint8 [rows, cols] in 0..15, scale and zero float32
    [rows, cols / 32]) with ``w = (q - 8) * scale + zero``."""
    block_bytes = {"Q4_0": 18, "Q4_1": 20}[ggml_type_name]
    blocks = raw.reshape(rows * cols // GROUP_SIZE, block_bytes)
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    if ggml_type_name == "Q4_1":
        zero = blocks[:, 2:4].contiguous().view(torch.float16).float() + 8 * scale  # m + 8d
        nibbles = blocks[:, 4:20]
    else:
        zero = torch.zeros_like(scale)
        nibbles = blocks[:, 2:18]
    # GGUF order: the low nibbles are weights 0..15 of the block, the high nibbles 16..31.
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1)
    groups = cols // GROUP_SIZE
    return q.reshape(rows, cols), scale.reshape(rows, groups), zero.reshape(rows, groups)


class GGUFCpuLinearMethod:
    """4-bit GGUF weights on the CPU. Layer state: ``int4_weight`` (the kernel's packed layout),
    ``int4_scales_zeros`` bf16 [in / 32, out, 2], and for long steps ``nibbles`` uint8
    [out, in / 2] with ``scales`` / ``zeros`` float32 [out, in / 32], and the weight those give
    decoded as ``copy`` says (see ``_copy_kind``): ``gemm_weight`` (float32, ``cpu_gemm``'s layout)
    or ``bf16_weight`` (bfloat16, oneDNN's)."""

    def __init__(self, copy: Optional[str] = None) -> None:
        if copy not in (None, *COPY_BYTES):
            raise ValueError(f"copy must be None, 'float32' or 'bfloat16', got {copy!r}.")
        self.copy = copy  # also hold each weight decoded for a GEMM (see above)

    @property
    def max_packed_rows(self) -> int:
        """Steps of up to this many rows run in the int4 kernel, longer ones on the decoded weight."""
        return {"bfloat16": PACKED_MAX_ROWS_WITH_BFLOAT16, "float32": PACKED_MAX_ROWS_WITH_GEMM}.get(
            self.copy, PACKED_MAX_TOKENS)

    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        layer.q4_shards = {}  # shard -> (q, scale, zero) until every shard is in

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return ("weight",)

    def load(self, layer: nn.Module, name: str, tensor: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             shard: str) -> None:
        """``tensor``: one shard's (q, scale, zero) from ``decode_q4_blocks`` (rows already in the
        model's order)."""
        if name != "weight":
            raise ValueError(f"unexpected tensor {name!r} for a GGUF 4-bit linear layer.")
        q = tensor[0]
        rows = layer.shard_offsets[shard][1]
        if tuple(q.shape) != (rows, layer.in_features):
            raise ValueError(f"shard {shard!r} has shape {tuple(q.shape)}, expected ({rows}, {layer.in_features}).")
        layer.q4_shards[shard] = tensor

    def process_after_loading(self, layer: nn.Module) -> None:
        parts = [layer.q4_shards[shard] for shard in layer.shard_offsets]
        del layer.q4_shards
        q, scale, zero = (torch.cat([part[i] for part in parts]) for i in range(3))
        state = {
            "int4_weight": _int4pack(q.to(torch.int32).contiguous(), 1),
            "int4_scales_zeros": torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16),
            "nibbles": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(),
            "scales": scale.contiguous(),
            "zeros": zero.contiguous(),
        }
        for name, tensor in state.items():
            layer.register_buffer(name, tensor, persistent=False)
        if layer.nibbles.device.type != "cpu":
            return
        if self.copy == "float32":
            layer.register_buffer("gemm_weight", cpu_gemm.pack(self.dequantize(layer)), persistent=False)
        elif self.copy == "bfloat16":  # an opaque oneDNN tensor: a plain attribute, as in cpu_linear
            layer.bf16_weight = torch.ops.mkldnn._reorder_linear_weight(self.dequantize(layer).to(torch.bfloat16),
                                                                        BFLOAT16_REORDER_ROWS)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The float32 weight [out, in] the layer holds (float32 scales, as the reference has them)."""
        out_features, in_features = layer.nibbles.shape[0], layer.in_features
        q = torch.stack([layer.nibbles & 0x0F, layer.nibbles >> 4], dim=-1).reshape(out_features, -1, GROUP_SIZE)
        weight = (q.to(torch.float32) - 8.0) * layer.scales[..., None] + layer.zeros[..., None]
        return weight.reshape(out_features, in_features)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.copy is not None and x.shape[0] > self.max_packed_rows:
            bf16_weight = getattr(layer, "bf16_weight", None)  # the copies exist only on the CPU
            if bf16_weight is not None:
                out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).contiguous(), bf16_weight, None,
                                                         "none", [], "").to(x.dtype)
                return out if bias is None else out + bias
            gemm_weight = getattr(layer, "gemm_weight", None)
            if gemm_weight is not None:
                out = cpu_gemm.linear(x.to(torch.float32), gemm_weight, layer.out_features,
                                      None if bias is None else bias.to(torch.float32))
                return out.to(x.dtype)
        if x.shape[0] > PACKED_MAX_TOKENS:
            return nn.functional.linear(x, self.dequantize(layer).to(x.dtype), bias)
        out = _int4pack_mm(x.to(torch.bfloat16), layer.int4_weight, GROUP_SIZE, layer.int4_scales_zeros).to(x.dtype)
        return out if bias is None else out + bias


class BFloat16OutputHead(nn.Module):
    """The output projection in bfloat16 (oneDNN's AMX / AVX-512 BF16 GEMM), for packed models:
    their linears already compute from bfloat16 activations. Logits come back in float32.

    The weight is also reordered once into oneDNN's blocked layout (unless
    ``OCTAVO_CPU_ONEDNN_LINEAR=0``): ``F.linear`` reorders it on every call, which at a decode
    step's few rows is most of the work (measured 3.0 -> 1.5 ms at 1 row, 6.5 -> 4.2 ms at 64,
    for SmolLM2's 49152 x 576)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        from octavo.layers.cpu_linear import onednn_linear_enabled

        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        self.onednn_weight = None
        if self.weight.device.type == "cpu" and onednn_linear_enabled():
            self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_weight is not None:
            out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).reshape(-1, x.shape[-1]).contiguous(),
                                                     self.onednn_weight, None, "none", [], "")
            return out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


class GGUFPackedLinear(nn.Module):
    """A linear layer whose weight stays in GGUF's 4-bit blocks (the adapter's layer type)."""

    def __init__(self, source: nn.Linear, method: GGUFCpuLinearMethod) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.shard_offsets = dict(getattr(source, "shard_offsets", None) or {"": (0, source.out_features)})
        self.bias = source.bias
        self.method = method
        method.create_weights(self, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        out = self.method.apply(self, x.reshape(-1, self.in_features), self.bias)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, GGUF 4-bit"


def _is_float_linear(module: nn.Module) -> bool:
    """A linear layer holding a plain float weight (torch's, or octavo's without quantization)."""
    from octavo.layers.linear import Linear
    from octavo.layers.quantization.base import UnquantizedLinearMethod

    if isinstance(module, Linear):
        return isinstance(module.quant_method, UnquantizedLinearMethod) and not module.reduce_output
    return isinstance(module, nn.Linear)


def _checkpoint_names(model: nn.Module, module_name: str, module: nn.Module) -> dict[str, str]:
    """shard -> the HF checkpoint module it comes from (``q`` -> ``...self_attn.q_proj``)."""
    parent, _, leaf = module_name.rpartition(".")
    by_shard = {shard: name for name, (fused, shard) in model.stacked_params.items() if fused == leaf}
    shards = getattr(module, "shard_offsets", None) or {"": None}
    return {shard: ".".join(filter(None, [parent, by_shard.get(shard, leaf)])) for shard in shards}


def bfloat16_copy_enabled() -> bool:
    """Whether the layers' decoded copy is bfloat16 for oneDNN: the switch (on unless
    ``OCTAVO_CPU_GGUF_BF16=0``), AMX's bfloat16 tiles (without them oneDNN's bfloat16 GEMM is no
    faster than the float32 one) and oneDNN's prepacked linear."""
    from octavo.layers.cpu_linear import onednn_linear_enabled

    return (cpu_extension.switch_on(BFLOAT16_ENV_SWITCH) and " amx_bf16" in cpu_extension.cpu_flags()
            and onednn_linear_enabled())


def _copy_fits(kind: str, num_weights: int) -> bool:
    """Whether a decoded copy of ``kind`` takes at most COPY_MAX_SHARE of the memory
    available now (a 7B model's float32 copy would be 28 GB: such models keep their blocks alone)."""
    available, needed = cpu_extension.available_memory_bytes(), COPY_BYTES[kind] * num_weights
    if available is None or needed > COPY_MAX_SHARE * available:
        logger.info("the 4-bit layers keep no %s copy: it would take %.1f GiB of %s available", kind,
                    needed / 2**30, "an unknown amount" if available is None else f"{available / 2**30:.1f} GiB")
        return False
    return True


def _float32_copy_fits(num_weights: int) -> bool:
    """Whether the layers can keep a float32 copy for cpu_gemm: the GEMM is built, the packed forms
    are on, and the copy fits (``_copy_fits``)."""
    from octavo.layers.cpu_linear import prepacking_enabled

    return prepacking_enabled() and cpu_gemm.load_gemm() and _copy_fits("float32", num_weights)


def _copy_kind(num_weights: int) -> Optional[str]:
    """The decoded copy the layers keep for long steps: ``"bfloat16"`` where
    ``bfloat16_copy_enabled`` and it fits, else ``"float32"`` where ``_float32_copy_fits``, else None."""
    if bfloat16_copy_enabled():
        return "bfloat16" if _copy_fits("bfloat16", num_weights) else None
    return "float32" if _float32_copy_fits(num_weights) else None


def pack_gguf_linears(model: nn.Module, path: str | Path) -> int:
    """Swap every linear layer whose GGUF tensors are all Q4_0 / Q4_1 for a ``GGUFPackedLinear``
    holding those blocks; others (and the embedding / output matrix) keep their float weights.
    Returns the number of layers packed."""
    from octavo.model_loader.gguf_loader import quantized_linear_blocks

    blocks = quantized_linear_blocks(path)
    method = GGUFCpuLinearMethod(copy=_copy_kind(sum(q.numel() for q, _, _ in blocks.values())))
    packed = 0
    for module_name, module in list(model.named_modules()):
        if not _is_float_linear(module) or module_name.endswith("lm_head"):
            continue
        names = _checkpoint_names(model, module_name, module)
        if not all(name in blocks for name in names.values()) or module.out_features % 16:
            continue
        rows = sum(blocks[name][0].shape[0] for name in names.values())
        if (rows, blocks[next(iter(names.values()))][0].shape[1]) != tuple(module.weight.shape):
            continue  # stored transposed (GPT-2's Conv1D layout): keep the float weight
        layer = GGUFPackedLinear(module, method)
        for shard, name in names.items():
            method.load(layer, "weight", blocks[name], shard)
        method.process_after_loading(layer)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        packed += 1
    lm_head = getattr(model, "lm_head", None)
    if packed and lm_head is not None and _is_float_linear(lm_head) and lm_head.bias is None:
        model.lm_head = BFloat16OutputHead(model.lm_head.weight)  # a tied embedding keeps its float rows
    logger.info("kept %d linear layers in GGUF 4-bit blocks%s", packed,
                " (and a %s copy for steps of more than %d rows)" % (method.copy, method.max_packed_rows)
                if method.copy and packed else "")
    return packed
