"""Rotary position embeddings (rotate-half form), with the Hugging Face rope scalings."""

from __future__ import annotations

import torch
from torch import nn

# Types whose frequencies depend on the current length are not a fixed table.
_UNSUPPORTED_ROPE = {"dynamic", "longrope"}


def rope_parameters(config) -> dict:
    """``rope_parameters`` in transformers 5 configs; older configs spread it over two fields."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def compute_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, using transformers' own rope formulas."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _UNSUPPORTED_ROPE:
        raise ValueError(f"rope type {rope_type!r} is not supported yet; supported: default, linear, llama3, yarn.")
    partial = getattr(config, "partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        base = params["rope_theta"]
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu") / rotary_dim
        inv_freq = 1.0 / (base**exponents)
        return inv_freq.float(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported.")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_position: int) -> None:
        super().__init__()
        inv_freq, scaling = compute_inv_freq(config, head_dim)
        self.rotary_dim = inv_freq.numel() * 2
        # Built on the CPU in float32 whatever the default device, then moved once.
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq.cpu())
        # [max_position, rotary_dim]: cos of both halves, then sin.
        cache = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """query/key ``[num_tokens, heads, head_dim]``; rotated in float32, returned in their dtype.

        CUDA tensors use the fused Triton kernel of ``octavo.layers.fused_ops``, which reads
        strided views (e.g. of the fused qkv output) without copies;
        ``OCTAVO_DISABLE_FUSED_OPS=1`` turns it off.
        """
        if query.is_cuda:
            from octavo.layers import fused_ops  # imported on first use: CPU runs never load triton

            if fused_ops.enabled():
                return fused_ops.rotary(positions, query, key, self.cos_sin_cache, self.rotary_dim)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        first, second = rot.float().chunk(2, dim=-1)
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, passthrough], dim=-1) if passthrough.numel() else rotated
