"""The experts computed one after another in plain PyTorch: the oracle, and the path off CUDA.

It gathers each expert's tokens by index, so the shapes it works on depend on the routing and
the host reads the per-expert counts: fine on a CPU, not inside a CUDA graph (the fused Triton
kernels of ``fused_moe`` are the CUDA path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_reference(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_j weight[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with ``e = ids[t, j]``.

    ``hidden [tokens, H]``, ``gate_up_proj [E, 2I, H]`` (gate rows then up rows),
    ``down_proj [E, H, I]``, ``topk_weights`` and ``topk_ids`` ``[tokens, top_k]``. Each
    expert's output is weighted and added into the result in the hidden dtype, expert by
    expert, as transformers' eager experts do.
    """
    num_experts = gate_up_proj.shape[0]
    top_k = topk_ids.shape[1]
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1)
    pairs_by_expert = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        pairs = pairs_by_expert[start:start + count]
        start += count
        tokens = pairs // top_k
        gate, up = F.linear(hidden[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, down_proj[expert]) * flat_weights[pairs, None]
        out.index_add_(0, tokens, expert_out.to(out.dtype))
    return out
