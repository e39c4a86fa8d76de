"""Sparse mixture-of-experts feed-forward: router, PyTorch reference, fused Triton kernels."""

from octavo.layers.moe.layer import FusedMoE, SparseMoeBlock
from octavo.layers.moe.reference import fused_experts_reference
from octavo.layers.moe.router import select_experts

__all__ = ["FusedMoE", "SparseMoeBlock", "fused_experts_reference", "select_experts"]
