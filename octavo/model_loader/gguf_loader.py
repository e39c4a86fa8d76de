"""Load a GGUF checkpoint (llama.cpp's single-file format) as a Hugging Face config and state dict.

A GGUF file carries the model's hyper-parameters as metadata, its tokenizer, and its tensors under
llama.cpp's names, often block-quantized. The engine builds models from HF configs and HF parameter
names, so this module translates all three:

* :func:`load_gguf_config` turns the metadata into a ``LlamaConfig`` / ``Qwen2Config`` /
  ``Qwen3Config`` / ``GPT2Config``;
* :func:`iter_gguf_weights` yields ``(hf_name, tensor)`` pairs, dequantized in torch and with the
  layout changes llama.cpp's converter made undone (LLaMA's rotary Q/K row permutation, GPT-2's
  transposed Conv1D weights);
* :func:`read_gguf_header` is the small parser both use (``gguf.GGUFReader`` builds several numpy
  objects per vocabulary entry, which costs seconds on a 50k-token vocabulary; we only need a
  few fields and the tensor offsets).

The tokenizer lives in :mod:`octavo.model_loader.gguf_tokenizer`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)
from transformers import GPT2Config, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from octavo.model_loader.loader import is_gguf as is_gguf_file

logger = logging.getLogger(__name__)

__all__ = [
    "GGUFHeader",
    "GGUFTensorInfo",
    "dequantize",
    "is_gguf_file",
    "iter_gguf_weights",
    "load_gguf_config",
    "read_gguf_header",
]

_MAGIC_BYTES = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"

# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype] = {
    vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMATS.items()
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file. ``shape`` is in torch order (outermost dim first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    """Parsed metadata and tensor directory of a GGUF file (no tensor data is read)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not arch:
            raise ValueError(
                f"{self.path} has no 'general.architecture' metadata; it is not a model GGUF "
                "(LoRA adapters and vocab-only files cannot be loaded as models)."
            )
        return str(arch)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """Metadata ``{arch}.{suffix}``, e.g. ``llama.context_length``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


class _Cursor:
    """Sequential little-endian reader over a buffer, with a clear error on truncation."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(
                f"{self.path} is truncated or corrupt (header needs byte {self.pos + n}, "
                f"file has {len(self.buf)}); re-download or re-convert it."
            )

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item_type in _ARRAY_DTYPES:
                dtype = _ARRAY_DTYPES[item_type]
                self._need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            return [self.value(item_type) for _ in range(count)]
        return self.scalar(_SCALAR_FORMATS[vtype])


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    if p.is_dir():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f" It contains: {', '.join(ggufs)}." if ggufs else ""
        raise IsADirectoryError(
            f"{p} is a directory; pass the path of the .gguf file itself.{hint}"
        )
    return p


@functools.lru_cache(maxsize=4)
def _read_header_cached(path: str, mtime_ns: int, size: int) -> GGUFHeader:
    p = Path(path)
    if size < 24:
        raise ValueError(f"{p} is not a GGUF file (only {size} bytes).")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC_BYTES:
            raise ValueError(
                f"{p} is not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF'). "
                "Pass a .gguf produced by llama.cpp's convert_hf_to_gguf.py, or load "
                "safetensors/PyTorch checkpoints through the regular model loader."
            )
        cur = _Cursor(buf, p)
        cur.pos = 4
        version = cur.scalar("<I")
        if version & 0xFFFF == 0 and version != 0:
            raise ValueError(f"{p} is a big-endian GGUF; only little-endian files are supported.")
        if version < 2:
            raise ValueError(
                f"{p} is GGUF version {version}; versions 2 and 3 are supported. "
                "Re-convert the model with a current llama.cpp."
            )
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            try:
                vtype = GGUFValueType(cur.scalar("<I"))
            except ValueError as exc:
                raise ValueError(f"{p}: metadata key {key!r} has an unknown value type") from exc
            metadata[key] = cur.value(vtype)

        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            type_id = cur.scalar("<I")
            rel_offset = cur.scalar("<Q")
            raw_infos.append((name, dims, type_id, rel_offset))

        alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        file_size = len(buf)

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, rel_offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError as exc:
            raise ValueError(
                f"{p}: tensor {name!r} has ggml type id {type_id}, unknown to the installed gguf "
                "package; upgrade it (pip install -U gguf) or use a file with another quant type."
            ) from exc
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = math.prod(dims)
        if dims and dims[0] % block_size:
            raise ValueError(
                f"{p}: tensor {name!r} row length {dims[0]} is not a multiple of the "
                f"{qtype.name} block size {block_size}; the file is corrupt."
            )
        nbytes = n_elements // block_size * type_size
        offset = data_start + rel_offset
        if offset + nbytes > file_size:
            raise ValueError(
                f"{p} is truncated: tensor {name!r} ends at byte {offset + nbytes}, the file has "
                f"{file_size}. Re-download it (or, for a split model, merge the parts with "
                "llama-gguf-split --merge)."
            )
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, nbytes)
    return GGUFHeader(path=p, version=version, metadata=metadata, tensors=tensors)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse the metadata and tensor directory of a GGUF file (cached per path and mtime)."""
    p = _check_path(path)
    st = p.stat()
    header = _read_header_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)
    n_split = header.metadata.get("split.count", 1)
    if int(n_split) > 1:
        raise NotImplementedError(
            f"{p} is part of a {n_split}-file split GGUF; merge it first with "
            "`llama-gguf-split --merge <first-part> <out.gguf>` and load the merged file."
        )
    return header


# --------------------------------------------------------------------------------------------
# Dequantization (torch, vectorized over blocks; mirrors gguf.quants bit for bit in float32)
# --------------------------------------------------------------------------------------------

_QK_K = 256


@functools.cache
def _shift(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


_S04 = (0, 4)
_S0246 = (0, 2, 4, 6)
_S0TO7 = tuple(range(8))
_CHUNK_BLOCKS = 1 << 15  # bounds temporaries to a few tens of MB per step

_PLAIN_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8,
    GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32,
    GGMLQuantizationType.I64: torch.int64,
}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scalar at byte ``start`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes into nibbles, low nibbles of each ``group`` bytes first, then the high ones.

    (n, k) bytes -> (n, 2 * k // group, group) values in 0..15.
    """
    n, k = qs.shape
    q = (qs.reshape(n, k // group, 1, group) >> _shift(_S04, qs.device).view(1, 1, 2, 1)) & 0x0F
    return q.reshape(n, 2 * k // group, group)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8, k): plane ``i`` holds bit ``i`` of every byte."""
    return (qh.unsqueeze(1) >> _shift(_S0TO7, qh.device).view(1, 8, 1)) & 1


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18], 16).reshape(-1, 32)
    return d * (q.to(torch.float32) - 8.0)


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20], 16).reshape(-1, 32)
    return d * q.to(torch.float32) + m


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    n = qs.shape[0]
    # bit j of the little-endian uint32 qh is the 5th bit of element j
    high = _bits(qh).transpose(1, 2).reshape(n, 32)
    low = _nibbles(qs, 16).reshape(n, 32)
    return low | (high << 4)


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _q5_values(b[:, 2:6], b[:, 6:22])
    return d * (q.to(torch.float32) - 16.0)


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _q5_values(b[:, 4:8], b[:, 8:24])
    return d * q.to(torch.float32) + m


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * d


def _deq_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shift(_S0246, b.device).view(1, 1, 4, 1)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, _QK_K)


def _deq_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    s04, s0246, s0to7 = (_shift(v, b.device) for v in (_S04, _S0246, _S0TO7))
    low = (scales[:, :8].reshape(n, 1, 8) >> s04.view(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:12].reshape(n, 1, 4) >> s0246.view(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.float32) - 32.0
    dl = (d * sc).reshape(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> s0246.view(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> s0to7.view(1, 1, 8, 1)) & 1).reshape(n, 16, 16)
    q = ql.to(torch.float32) - ((qh ^ 1) << 2).to(torch.float32)  # a set hmask bit means "no -4"
    return (dl * q).reshape(n, _QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte, 6-bit (scale, min) pairs of Q4_K/Q5_K into two (n, 8) tensors."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144], 32).to(torch.float32)
    return (dl * q - ml).reshape(n, _QK_K)


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:176], 32)
    high = _bits(b[:, 16:48])  # (n, 8, 32)
    q = (low | (high << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, _QK_K)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    s04, s0246 = _shift(_S04, b.device), _shift(_S0246, b.device)
    low = ((ql.reshape(n, 2, 1, 64) >> s04.view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> s0246.view(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32) - 32.0
    return (d * q.reshape(n, 16, 16)).reshape(n, _QK_K)


_TORCH_DEQUANT = {
    GGMLQuantizationType.Q4_0: _deq_q4_0,
    GGMLQuantizationType.Q4_1: _deq_q4_1,
    GGMLQuantizationType.Q5_0: _deq_q5_0,
    GGMLQuantizationType.Q5_1: _deq_q5_1,
    GGMLQuantizationType.Q8_0: _deq_q8_0,
    GGMLQuantizationType.Q2_K: _deq_q2_k,
    GGMLQuantizationType.Q3_K: _deq_q3_k,
    GGMLQuantizationType.Q4_K: _deq_q4_k,
    GGMLQuantizationType.Q5_K: _deq_q5_k,
    GGMLQuantizationType.Q6_K: _deq_q6_k,
}


def dequantize(
    raw: torch.Tensor,
    ggml_type: GGMLQuantizationType | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode a tensor's raw GGUF bytes (1-D uint8) into ``shape`` (torch order) and ``dtype``.

    Common types are decoded with torch ops on ``raw``'s device (so a CUDA ``raw`` decodes on
    the GPU); rarer ones (IQ*, TQ*, MXFP4, ...) go through ``gguf.quants.dequantize`` on the CPU.
    In float32 the result is bit-identical to ``gguf.quants.dequantize``.
    """
    qtype = GGMLQuantizationType(ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    n_elements = math.prod(shape)
    expected = n_elements // block_size * type_size
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape} needs {expected} raw uint8 bytes, "
            f"got {raw.numel()} of {raw.dtype}"
        )
    raw = raw.reshape(-1)
    if qtype in _PLAIN_TYPES:
        return raw.view(_PLAIN_TYPES[qtype]).reshape(shape).to(dtype)
    n_blocks = n_elements // block_size
    fn = _TORCH_DEQUANT.get(qtype)
    if fn is None:
        return _numpy_dequantize(raw.cpu(), qtype, shape).to(raw.device, dtype)
    blocks = raw.view(n_blocks, type_size)
    out = torch.empty(n_blocks, block_size, dtype=dtype, device=raw.device)
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, n_blocks)
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(shape)


def _numpy_dequantize(
    raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    from gguf import quants

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = shape[-1] // block_size * type_size
    try:
        arr = quants.dequantize(raw.numpy().reshape(-1, row_bytes), qtype)
    except NotImplementedError as exc:
        supported = sorted(t.name for t in (*_PLAIN_TYPES, *_TORCH_DEQUANT))
        raise ValueError(
            f"GGUF tensor type {qtype.name} cannot be dequantized by this loader or the installed "
            f"gguf package. Supported here: {', '.join(supported)} (plus what gguf.quants "
            "handles). Use a GGUF with another quantization (e.g. Q4_K_M, Q8_0 or F16)."
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)


def _read_raw(f: Any, info: GGUFTensorInfo) -> torch.Tensor:
    """Read a tensor's bytes into a fresh (writable, torch-owned) uint8 buffer."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    view = memoryview(buf.numpy())
    got = 0
    while got < info.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"unexpected end of file while reading tensor {info.name!r}")
        got += n
    return buf


# Decoding is a handful of elementwise ops per block. On a small or busy CPU the OpenMP barrier of
# every op costs more than the parallelism saves (measured: 5-9x slower with 2 threads than with
# 1 on a loaded 2-core box), so small tensors, and everything on machines with few cores, are
# decoded single-threaded. Pass device="cuda" to decode on the GPU instead.
_SERIAL_BELOW_ELEMENTS = 1 << 22
_SERIAL_UP_TO_CPUS = 4


def _cpu_threads_for(n_elements: int) -> int:
    if n_elements < _SERIAL_BELOW_ELEMENTS or (os.cpu_count() or 1) <= _SERIAL_UP_TO_CPUS:
        return 1
    return torch.get_num_threads()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (process-global; restored on exit)."""
    prev = torch.get_num_threads()
    if n >= prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _load_tensor(
    f: Any, info: GGUFTensorInfo, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    raw = _read_raw(f, info)
    if device is not None and device.type != "cpu":
        raw = raw.to(device)
    return dequantize(raw, info.ggml_type, info.shape, dtype)


# --------------------------------------------------------------------------------------------
# Architectures: names, config, layout fix-ups
# --------------------------------------------------------------------------------------------

_DECODER_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_DECODER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GPT2_TOP = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}


@dataclass(frozen=True)
class _ArchSpec:
    hf_architecture: str
    config_class: type[PretrainedConfig]
    layer_prefix: str  # "model.layers" / "transformer.h"
    top_names: dict[str, str]
    layer_names: dict[str, str]
    # convert_hf_to_gguf.py permutes LLaMA's q_proj/k_proj rows (rotary halves -> interleaved
    # pairs, what ggml's rope wants); its Qwen2/Qwen3 converters do not.
    permute_qk: bool = False
    # GGUF keeps GPT-2's Conv1D weights transposed to (out, in); HF wants (in, out).
    transposed: frozenset[str] = frozenset()
    # tensors the HF model recomputes itself (llama3 rope factors live in the config)
    ignored: frozenset[str] = frozenset({"rope_freqs", "attn_rot_embd"})


_ARCHS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(
        "LlamaForCausalLM", LlamaConfig, "model.layers", _DECODER_TOP, _DECODER_LAYER,
        permute_qk=True,
    ),
    "qwen2": _ArchSpec(
        "Qwen2ForCausalLM", Qwen2Config, "model.layers", _DECODER_TOP, _DECODER_LAYER,
    ),
    "qwen3": _ArchSpec(
        "Qwen3ForCausalLM", Qwen3Config, "model.layers", _DECODER_TOP,
        {**_DECODER_LAYER, **_QK_NORM},
    ),
    "gpt2": _ArchSpec(
        "GPT2LMHeadModel", GPT2Config, "transformer.h", _GPT2_TOP, _GPT2_LAYER,
        transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"}),
    ),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHS)

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def _spec(header: GGUFHeader) -> _ArchSpec:
    arch = header.architecture
    spec = _ARCHS.get(arch)
    if spec is None:
        raise ValueError(
            f"{header.path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Load the original Hugging Face checkpoint "
            "(safetensors) instead."
        )
    return spec


def _hf_name(spec: _ArchSpec, gguf_name: str) -> tuple[str, str] | None:
    """(hf_name, gguf_kind) for a GGUF tensor name; None for tensors the HF model does not keep."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, kind, suffix = m.groups()
        if kind in spec.ignored:
            return None
        hf = spec.layer_names.get(kind)
        if hf is not None:
            return f"{spec.layer_prefix}.{layer}.{hf}.{suffix}", kind
    else:
        m = _TOP_RE.match(gguf_name)
        if m:
            kind, suffix = m.groups()
            if kind in spec.ignored:
                return None
            hf = spec.top_names.get(kind)
            if hf is not None:
                return f"{hf}.{suffix}", kind
    moe = "exps" in gguf_name or "gate_inp" in gguf_name
    hint = " (a mixture-of-experts model?)" if moe else ""
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in "
        f"{spec.hf_architecture}{hint}; this variant of the architecture is not supported."
    )


def _int(header: GGUFHeader, suffix: str, default: int | None = None) -> int:
    value = header.arch_key(suffix, default)
    if value is None:
        raise ValueError(
            f"{header.path}: required metadata '{header.architecture}.{suffix}' is missing; "
            "the file is incomplete. Re-convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    if isinstance(value, np.ndarray):  # per-layer values (e.g. head_count_kv)
        uniq = set(value.tolist())
        if len(uniq) != 1:
            raise ValueError(
                f"{header.path}: '{header.architecture}.{suffix}' varies per layer "
                f"({sorted(uniq)}); such models are not supported."
            )
        value = uniq.pop()
    return int(value)


def _token_id(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


# llama.cpp's converter stores Llama 3.1+ "llama3" rope scaling only as a per-frequency divisor
# tensor (rope_freqs.weight); its four parameters are not in the metadata. We recover them by
# recomputing the tensor for the commonly published parameter sets.
_LLAMA3_CANDIDATES = [
    (orig, low, high)
    for orig in (8192, 4096, 16384, 2048, 32768, 131072)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 8.0))
]


def _llama3_factors(
    theta: float, head_dim: int, factor: float, orig: int, low: float, high: float
) -> np.ndarray:
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _llama3_rope(header: GGUFHeader, theta: float, head_dim: int) -> dict[str, Any] | None:
    info = header.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    with open(header.path, "rb") as f:
        factors = _load_tensor(f, info, torch.float64).numpy().astype(np.float64)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    for orig, low, high in _LLAMA3_CANDIDATES:
        expected = _llama3_factors(theta, head_dim, factor, orig, low, high)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4):
            break
    else:
        orig, low, high = 8192, 1.0, 4.0
        logger.warning(
            "%s: rope_freqs.weight matches no known llama3 rope parameter set; assuming "
            "factor=%s, low_freq_factor=1, high_freq_factor=4, original context 8192.",
            header.path, factor,
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _rope_parameters(header: GGUFHeader, head_dim: int) -> dict[str, Any]:
    theta = float(header.arch_key("rope.freq_base", 10000.0))
    params: dict[str, Any] = {"rope_type": "default"}
    scaling = header.arch_key("rope.scaling.type")
    factor = header.arch_key("rope.scaling.factor")
    if scaling is None and header.arch_key("rope.scale_linear") not in (None, 1.0):
        scaling, factor = "linear", header.arch_key("rope.scale_linear")
    if scaling in ("linear", "yarn") and factor is not None and float(factor) != 1.0:
        params = {"rope_type": scaling, "factor": float(factor)}
        if scaling == "yarn":
            orig = header.arch_key("rope.scaling.original_context_length")
            if orig is not None:
                params["original_max_position_embeddings"] = int(orig)
            # (llama.cpp's attn_factor keys are left out: HF derives the same default mscale)
            for gguf_key, hf_key in (
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ):
                value = header.arch_key(gguf_key)
                if value is not None:
                    params[hf_key] = float(value)
    elif scaling not in (None, "none", "linear", "yarn"):
        raise ValueError(
            f"{header.path}: rope scaling type {scaling!r} is not supported (supported: none, "
            "linear, yarn, and llama3 via rope_freqs)."
        )
    elif header.architecture == "llama":
        params = _llama3_rope(header, theta, head_dim) or params
    params["rope_theta"] = theta
    return params


def _stop_token_ids(header: GGUFHeader) -> int | list[int] | None:
    """eos plus the end-of-turn / end-of-message ids llama.cpp also stops on."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        tid = _token_id(header, key)
        if tid is not None and tid not in ids:
            ids.append(tid)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def _build_config(header: GGUFHeader) -> PretrainedConfig:
    spec = _spec(header)
    for name in header.tensors:  # fail early on tensors we could not place
        _hf_name(spec, name)
    arch = header.architecture
    tensors = header.tensors
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{header.path}: no token_embd.weight tensor; not a complete model.")
    vocab_size = int(header.arch_key("vocab_size", tensors["token_embd.weight"].shape[0]))
    hidden = _int(header, "embedding_length")
    n_heads = _int(header, "attention.head_count")
    n_layers = _int(header, "block_count")
    ctx = _int(header, "context_length", 2048)
    ffn = _int(header, "feed_forward_length")
    tied = "output.weight" not in tensors
    common: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": _token_id(header, "bos_token_id"),
        "eos_token_id": _stop_token_ids(header),
        "pad_token_id": _token_id(header, "padding_token_id"),
    }
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=ffn,
            n_positions=ctx,
            layer_norm_epsilon=float(header.arch_key("attention.layer_norm_epsilon", 1e-5)),
            activation_function="gelu_new",
            **common,
        )

    n_kv = _int(header, "attention.head_count_kv", n_heads)
    head_dim = _int(header, "attention.key_length", hidden // n_heads)
    value_dim = _int(header, "attention.value_length", head_dim)
    rope_dim = _int(header, "rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"{header.path}: key/value/rotary head sizes differ ({head_dim}/{value_dim}/"
            f"{rope_dim}); {spec.hf_architecture} needs them equal."
        )
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": ctx,
        "rms_norm_eps": float(header.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": _rope_parameters(header, head_dim),
        "hidden_act": "silu",
    }
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
        kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    elif arch == "qwen3":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
    elif arch == "qwen2":
        del kwargs["head_dim"]  # Qwen2Config derives it
        if head_dim != hidden // n_heads:
            raise ValueError(f"{header.path}: Qwen2 needs head_dim == hidden/heads.")
    return spec.config_class(**kwargs, **common)


def load_gguf_config(path: str | os.PathLike) -> PretrainedConfig:
    """Build the HF config (``architectures`` set) that the GGUF's tensors fit.

    ``eos_token_id`` is a list when the file names distinct end-of-turn / end-of-message tokens,
    so that generation stops on them as llama.cpp does.
    """
    return _build_config(read_gguf_header(path))


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's LLaMA permute(): rows (head, pair, 2) -> (head, 2, pair)."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
        .contiguous()
    )


def iter_gguf_weights(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_parameter_name, tensor)`` in file order, dequantized to ``dtype``.

    Names and shapes match the HF model's ``state_dict()``; ``lm_head.weight`` is yielded only
    when the file has an ``output.weight`` (otherwise the embeddings are tied). One tensor is
    decoded at a time, so peak memory stays near the size of the largest tensor. With
    ``device="cuda"`` the raw blocks are copied to the GPU and decoded there (much faster for
    large models); by default tensors are decoded and returned on the CPU.
    """
    header = read_gguf_header(path)
    spec = _spec(header)
    config = _build_config(header)
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None)
    dev = torch.device(device) if device is not None else None
    on_cpu = dev is None or dev.type == "cpu"
    with open(header.path, "rb") as f:
        for info in header.tensors.values():
            mapped = _hf_name(spec, info.name)
            if mapped is None:
                continue
            hf_name, kind = mapped
            n_threads = _cpu_threads_for(math.prod(info.shape)) if on_cpu else 1 << 30
            with _torch_threads(n_threads):
                tensor = _load_tensor(f, info, dtype, dev)
                if spec.permute_qk and kind in ("attn_q", "attn_k"):
                    tensor = _unpermute(tensor, n_heads if kind == "attn_q" else n_kv)
                if kind in spec.transposed and hf_name.endswith(".weight"):
                    tensor = tensor.t().contiguous()
            yield hf_name, tensor


_PACKABLE_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1})


def quantized_linear_blocks(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The 4-bit (Q4_0 / Q4_1) matrices of a GGUF, undecoded: HF module name (``...q_proj``) ->
    (q uint8 [rows, cols], scale, zero float32 [rows, cols / 32]) with ``w = (q - 8) * scale + zero``,
    rows in the HF order (LLaMA's rotary permutation undone). The embedding matrix is left out:
    its rows are looked up, not multiplied."""
    from octavo.layers.quantization.gguf_cpu import decode_q4_blocks

    header = read_gguf_header(path)
    spec = _spec(header)
    config = _build_config(header)
    found = {}
    with open(header.path, "rb") as f:
        for info in header.tensors.values():
            mapped = _hf_name(spec, info.name)
            if mapped is None or info.ggml_type not in _PACKABLE_TYPES or len(info.shape) != 2:
                continue
            hf_name, kind = mapped
            if not hf_name.endswith(".weight") or kind in spec.transposed or kind == "token_embd":
                continue
            rows, cols = info.shape
            q, scale, zero = decode_q4_blocks(_read_raw(f, info), info.ggml_type.name, rows, cols)
            if spec.permute_qk and kind in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
                q, scale, zero = (_unpermute(t, heads) for t in (q, scale, zero))
            found[hf_name.removesuffix(".weight")] = (q, scale, zero)
    return found
