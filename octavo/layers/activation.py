"""Activations, including the gated forms used by Llama-style (SwiGLU) and Gemma (GeGLU) MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from octavo.layers import cpu_fused


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` on a fused ``[gate | up]`` input.

    CUDA tensors use the fused Triton kernel of ``octavo.layers.fused_ops`` (fp32 inside, one
    rounding; ``OCTAVO_DISABLE_FUSED_OPS=1`` turns it off).
    """

    def __init__(self) -> None:
        super().__init__()
        self.cpu_fused = cpu_fused.fused_ops_enabled()  # the switch, read when the model is built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from octavo.layers import fused_ops  # imported on first use: CPU runs never load triton

            if fused_ops.enabled():
                return fused_ops.silu_and_mul(x)
        elif self.cpu_fused and cpu_fused.use_fused(x):
            return cpu_fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ActAndMul(nn.Module):
    """``act(gate) * up`` on a fused ``[gate | up]`` input, for any activation (GeGLU: a GELU)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def gated_activation(name: str) -> nn.Module:
    """The gate of a ``[gate | up]`` MLP: the fused SiLU kernel for SwiGLU, else ``ActAndMul``."""
    return SiluAndMul() if name in ("silu", "swish") else ActAndMul(name)
