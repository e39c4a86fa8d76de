"""The sparse MoE feed-forward: a router, stacked experts, and an optional shared expert."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from octavo.layers.moe.reference import fused_experts_reference
from octavo.layers.moe.router import select_experts
from octavo.layers.sharded_init import fill_normal_slice
from octavo.worker.parallel_state import tp_group

# Per-expert checkpoint names -> the projection they hold: Mixtral's w1/w3/w2 and the
# gate_proj/up_proj/down_proj of Qwen2/3-MoE (and of hub checkpoints in general).
_EXPERT_PROJECTIONS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down",
                       "down_proj": "down"}
_PER_EXPERT_NAME = re.compile(r"(\d+)\.(\w+)\.weight")
# The stacked names transformers 5 uses in memory (and writes with save_original_format=False).
_STACKED = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


class FusedMoE(nn.Module):
    """``num_experts`` SiLU-gated MLPs stored as stacks, run together for the routed tokens.

    ``gate_up_proj [E, 2I, H]`` holds each expert's gate rows then its up rows, and
    ``down_proj [E, H, I]`` its down projection: per expert, the ``[out, in]`` weight of an
    ``nn.Linear``, the layout per-channel or per-group quantization formats keep. On CUDA the
    fused Triton kernels run (``fused_moe``, CUDA-graph safe); elsewhere the PyTorch reference.

    Checkpoints provide the stacks as they are, or one tensor per expert and projection
    (``3.w1.weight``, ``3.gate_proj.weight``, ...); ``load_checkpoint_tensor`` takes both.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        # Under tensor parallelism each rank holds its slice of every expert's intermediate rows
        # (gate and up rows, down columns): the SiLU-gate is elementwise over them, so the ranks'
        # down projections are partial sums, added by one all-reduce (``reduce_output``).
        group = tp_group()
        self.full_intermediate_size = intermediate_size
        self.shard_start, self.intermediate_size = group.shard(intermediate_size, "the experts' intermediate size")
        self.reduce_output = group.world_size > 1
        local = self.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, local))
        self._loaded: set[tuple[int, str]] = set()  # (expert, projection) pairs copied in
        self._checkpoint_names: dict[str, str] = {}  # projection -> the checkpoint's name for it

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = None
        if hidden.is_cuda:
            from octavo.layers.attention.triton_ops import triton  # first use: CPU runs never load triton
            from octavo.layers.moe import fused_moe

            if triton is not None:
                out = fused_moe.fused_experts(hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        if out is None:
            out = fused_experts_reference(hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return tp_group().all_reduce(out) if self.reduce_output else out

    def _rows(self, projection: str) -> slice:
        size = self.intermediate_size
        return {"gate": slice(0, size), "up": slice(size, 2 * size), "down": slice(None)}[projection]

    def _local(self, projection: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of one expert's full checkpoint tensor of ``projection``."""
        dim = 1 if projection == "down" else 0
        full = (self.hidden_size, self.full_intermediate_size) if projection == "down" \
            else (self.full_intermediate_size, self.hidden_size)
        if tuple(tensor.shape) != full:
            raise ValueError(f"has shape {tuple(tensor.shape)}, the model expects {full}.")
        return tensor.narrow(dim, self.shard_start, self.intermediate_size)

    @torch.no_grad()
    def init_dummy(self, key: str, seed: int) -> None:
        """Random experts drawn per (expert, projection) by name, the same at any tensor-parallel size."""
        hidden, full, start, local = self.hidden_size, self.full_intermediate_size, self.shard_start, \
            self.intermediate_size
        for expert in range(self.num_experts):
            for projection in ("gate", "up"):
                fill_normal_slice(self.gate_up_proj[expert, self._rows(projection)], f"{key}.{expert}.{projection}",
                                  seed, (full, hidden), start)
            fill_normal_slice(self.down_proj[expert], f"{key}.{expert}.down", seed, (hidden, full), 0, start)

    @torch.no_grad()
    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy in a checkpoint tensor named relative to this module (``gate_up_proj``,
        ``down_proj``, or ``<expert>.<projection>.weight``)."""
        if name in _STACKED:
            full = self.full_intermediate_size
            expected = ((self.num_experts, 2 * full, self.hidden_size) if name == "gate_up_proj"
                        else (self.num_experts, self.hidden_size, full))
            if tuple(tensor.shape) != expected:
                raise ValueError(f"has shape {tuple(tensor.shape)}, the model expects {expected}.")
            for projection in _STACKED[name]:
                part = tensor[:, full:] if projection == "up" else tensor[:, :full] if projection == "gate" else tensor
                target = (self.down_proj if projection == "down" else self.gate_up_proj)[:, self._rows(projection)]
                dim = 2 if projection == "down" else 1
                target.copy_(part.narrow(dim, self.shard_start, self.intermediate_size))
            self._loaded.update((expert, projection) for expert in range(self.num_experts)
                                for projection in _STACKED[name])
            return
        match = _PER_EXPERT_NAME.fullmatch(name)
        if match is None or match.group(2) not in _EXPERT_PROJECTIONS:
            raise ValueError("does not match any expert weight (expected gate_up_proj, down_proj or "
                             f"<expert>.<{'|'.join(_EXPERT_PROJECTIONS)}>.weight).")
        expert, checkpoint_name = int(match.group(1)), match.group(2)
        if expert >= self.num_experts:
            raise ValueError(f"names expert {expert}, but the config has {self.num_experts} experts.")
        projection = _EXPERT_PROJECTIONS[checkpoint_name]
        param = self.down_proj if projection == "down" else self.gate_up_proj
        param[expert, self._rows(projection)].copy_(self._local(projection, tensor))
        self._loaded.add((expert, projection))
        self._checkpoint_names[projection] = checkpoint_name

    def missing_checkpoint_tensors(self) -> list[str]:
        """Names (relative to this module) of what the checkpoint has not provided: a whole stack
        when none of it came, else the single expert tensors."""
        missing = []
        for stacked, projections in _STACKED.items():
            absent = [(expert, projection) for expert in range(self.num_experts) for projection in projections
                      if (expert, projection) not in self._loaded]
            if len(absent) == self.num_experts * len(projections):
                missing.append(stacked)
            else:
                missing += [f"{expert}.{self._checkpoint_names.get(projection, projection)}.weight"
                            for expert, projection in absent]
        return missing


class SparseMoeBlock(nn.Module):
    """Mixtral's and Qwen2/3-MoE's feed-forward: each token runs through its ``top_k`` experts,
    weighted by the router; Qwen2-MoE adds a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.

    Submodule names follow the checkpoints': ``gate`` (the router), ``experts``,
    ``shared_expert``, ``shared_expert_gate``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, activation: str = "silu", shared_expert: Optional[nn.Module] = None) -> None:
        super().__init__()
        if activation not in ("silu", "swish"):
            raise ValueError(f"hidden_act {activation!r} is not supported for MoE experts; they run SiLU-gated MLPs.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{num_experts} (the number of experts), got {top_k}.")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(self.gate(hidden), self.top_k, self.renormalize)
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out
