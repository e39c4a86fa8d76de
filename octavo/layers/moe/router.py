"""Top-k routing of tokens to experts."""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts and their weights, as Mixtral and Qwen2/3-MoE route.

    Softmax over all experts in float32, then the ``top_k`` largest probabilities; with
    ``renormalize`` (Mixtral always, Qwen with ``norm_topk_prob``) they are rescaled to sum to
    one. Returns ``(weights [tokens, top_k] float32, expert ids [tokens, top_k] int32)``. Shapes
    depend only on the input's, so this runs inside CUDA graphs.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
