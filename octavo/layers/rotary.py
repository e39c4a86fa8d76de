"""Rotary position embeddings with the Hugging Face rope scalings.

Two pairings of the rotated dims: rotate-half (Llama, GPT-NeoX: dim ``i`` with ``i + rotary_dim / 2``)
and interleaved (GPT-J: dim ``2i`` with ``2i + 1``). Only the first ``rotary_dim`` dims of a head
rotate (partial rotary, Phi-2); the rest pass through.

LongRoPE (Phi-3) has two frequency sets: the short factors while a sequence is within
``original_max_position_embeddings`` tokens, the long ones once it is longer, for every token
computed from then on, as in transformers. transformers then recomputes the whole sequence, so
a sequence that grows past that length by decoding (or a prompt prefilled in chunks, or a
prefix-cache hit from a shorter sequence) keeps keys computed with the short factors here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.attention.metadata import AttentionMetadata

# Types whose frequencies depend on the current length are not a fixed table.
_UNSUPPORTED_ROPE = {"dynamic"}


def rope_parameters(config) -> dict:
    """``rope_parameters`` in transformers 5 configs; older configs spread it over two fields."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def rotary_dim_of(config, head_dim: int) -> int:
    """How many dims of a head rotate: ``partial_rotary_factor`` of them (transformers 5 keeps the
    factor in ``rope_parameters``, older configs on the config itself)."""
    partial = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * partial)


def _default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu") / rotary_dim
    return (1.0 / (base**exponents)).float()


def compute_inv_freq(config, head_dim: int, rotary_dim: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, using transformers' own rope formulas."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _UNSUPPORTED_ROPE:
        raise ValueError(
            f"rope type {rope_type!r} is not supported yet; supported: default, linear, llama3, yarn, longrope."
        )
    if rope_type == "default":
        return _default_inv_freq(params["rope_theta"], rotary_dim or rotary_dim_of(config, head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported.")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def longrope_cos_sin_cache(config, max_position: int) -> tuple[torch.Tensor, int]:
    """LongRoPE's table: ``max_position`` rows with the short factors, then as many with the long
    ones (both with the same attention scale), and the length past which the long rows apply."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = int(rope_parameters(config)["original_max_position_embeddings"])
    compute = ROPE_INIT_FUNCTIONS["longrope"]
    short, scaling = compute(config, torch.device("cpu"))
    long, _ = compute(config, torch.device("cpu"), seq_len=original + 1)
    positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
    cache = torch.cat([_cos_sin(positions, short.float(), float(scaling)),
                       _cos_sin(positions, long.float(), float(scaling))])
    return cache, original


def token_seq_lens(metadata: AttentionMetadata, num_tokens: int) -> torch.Tensor:
    """Each token's sequence length after this step, on the device, without a host sync."""
    if metadata.is_decode_only:
        return metadata.seq_lens[:num_tokens]
    query_lens = metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]
    return torch.repeat_interleave(metadata.seq_lens, query_lens, output_size=num_tokens)


class RotaryEmbedding(nn.Module):
    """``rotary_dim`` overrides the config's partial rotary factor (GPT-J names the dims directly);
    ``interleaved`` pairs neighbouring dims (GPT-J) instead of the two halves."""

    def __init__(self, config, head_dim: int, max_position: int, rotary_dim: Optional[int] = None,
                 interleaved: bool = False) -> None:
        super().__init__()
        self.interleaved = interleaved
        self.max_position = max_position
        self.long_after: Optional[int] = None  # LongRoPE: sequences longer than this use the long rows
        # Built on the CPU in float32 whatever the default device, then moved once.
        if rope_parameters(config).get("rope_type") == "longrope":
            cache, self.long_after = longrope_cos_sin_cache(config, max_position)
        else:
            inv_freq, scaling = compute_inv_freq(config, head_dim, rotary_dim)
            cache = _cos_sin(torch.arange(max_position, dtype=torch.float32, device="cpu"), inv_freq.cpu(), scaling)
        # [max_position (x2 for LongRoPE), rotary_dim]: the cos of every frequency, then its sin.
        self.rotary_dim = cache.shape[-1]
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def cache_rows(self, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The rows of ``cos_sin_cache`` that ``forward`` should read for these token positions:
        the positions themselves, except that LongRoPE moves tokens of long sequences to the
        long-factor rows. Computed once per step, before the layers."""
        if self.long_after is None:
            return positions
        is_long = token_seq_lens(metadata, positions.shape[0]) > self.long_after
        return positions + is_long.to(positions.dtype) * self.max_position

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """query/key ``[num_tokens, heads, head_dim]``; rotated in float32, returned in their dtype.
        ``positions`` are rows of the cache (see ``cache_rows``).

        CUDA tensors use the fused rotate-half Triton kernel of ``octavo.layers.fused_ops``, which
        reads strided views (e.g. of the fused qkv output) without copies;
        ``OCTAVO_DISABLE_FUSED_OPS=1`` turns it off. The interleaved pairing runs in PyTorch.
        """
        if query.is_cuda and not self.interleaved:
            from octavo.layers import fused_ops  # imported on first use: CPU runs never load triton

            if fused_ops.enabled():
                return fused_ops.rotary(positions, query, key, self.cos_sin_cache, self.rotary_dim)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def can_rotate_joint(self, x: torch.Tensor, head_dim: int) -> bool:
        """Whether ``rotate_joint`` serves heads of ``head_dim`` in ``x``: the CPU, float32,
        rotate-half over whole heads."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and not self.interleaved
                and self.rotary_dim == head_dim and head_dim % 2 == 0)

    def _joint_tables(self, positions: torch.Tensor, per_step: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cos, cos]`` and ``[-sin, sin]`` rows for ``positions``, ``[tokens, 1, rotary_dim]``;
        built in the first layer of a step and kept in the step's ``per_step`` dict (the
        attention metadata's) for the others."""
        key = ("rotary_joint", id(self))
        if per_step is not None and key in per_step:
            return per_step[key]
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        tables = torch.cat([cos, cos], dim=-1)[:, None, :], torch.cat([-sin, sin], dim=-1)[:, None, :]
        if per_step is not None:
            per_step[key] = tables
        return tables

    def rotate_joint(self, positions: torch.Tensor, x: torch.Tensor, per_step: Optional[dict] = None) -> torch.Tensor:
        """Rotate-half rotary on query and key heads side by side (``x`` [tokens, heads, head_dim],
        e.g. the q and k columns of a fused qkv output): four operators for both instead of
        about eight each, and the cos/sin rows gathered once per step (``per_step``: a dict that
        lives for one step). The same roundings as ``forward``: ``x1 * cos + x2 * (-sin)`` is
        ``x1 * cos - x2 * sin`` exactly."""
        cos_full, sin_signed = self._joint_tables(positions, per_step)
        half = x.shape[-1] // 2
        return x * cos_full + x.roll(half, dims=-1) * sin_signed

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            pairs = rot.float().unflatten(-1, (-1, 2))
            first, second = pairs[..., 0], pairs[..., 1]
            rotated = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1)
            rotated = rotated.flatten(-2).to(x.dtype)
        else:
            first, second = rot.float().chunk(2, dim=-1)
            rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, passthrough], dim=-1) if passthrough.numel() else rotated
