"""What every model class provides to the model runner, and shared weight loading."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from octavo.layers.attention import Attention, AttentionMetadata
from octavo.layers.linear import MergedLinear
from octavo.layers.moe import FusedMoE


class CausalLM(nn.Module):
    """Base for decoder-only models over a flat token batch.

    Subclasses set ``stacked_params``: checkpoint sub-module name -> (fused module
    name, shard), e.g. ``"q_proj": ("qkv_proj", "q")``, and ``ignored_weights``:
    name fragments of checkpoint tensors that carry nothing we need.
    """

    stacked_params: dict[str, tuple[str, str]] = {}
    ignored_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)
    tie_word_embeddings: bool = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype; consumers upcast only what they need (a greedy argmax
        on bfloat16 picks the same token as on its exact float32 copy)."""
        raise NotImplementedError

    def attention_layers(self) -> list[Attention]:
        return [module for module in self.modules() if isinstance(module, Attention)]

    def rename_checkpoint_weight(self, name: str) -> str:
        """Map a checkpoint name onto this module's naming (identity by default)."""
        return name

    def checkpoint_name(self, name: str) -> str:
        """The inverse of ``rename_checkpoint_weight``, to report a missing tensor by the name
        the checkpoint should have used."""
        return name

    def transform_checkpoint_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in, fusing shards; fail loudly on anything missing or unknown."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        experts = {name: module for name, module in modules.items() if isinstance(module, FusedMoE)}
        loaded: set[str] = set()
        for checkpoint_name, tensor in weights:
            if any(fragment in checkpoint_name for fragment in self.ignored_weights):
                continue
            name = self.rename_checkpoint_weight(checkpoint_name)
            if name is None:
                continue
            tensor = self.transform_checkpoint_weight(name, tensor)
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            owner = _owning_module(name, experts)
            if owner is not None:  # stacked experts take per-expert and stacked tensors alike
                try:
                    experts[owner].load_checkpoint_tensor(name[len(owner) + 1:], tensor)
                except ValueError as error:
                    raise ValueError(f"checkpoint tensor {checkpoint_name!r} {error}") from None
                continue
            target = self._stacked_target(name)
            if target is not None:
                module_name, shard, param = target
                module = modules[module_name]
                assert isinstance(module, MergedLinear)
                module.load_shard(shard, param, tensor)
                loaded.add(f"{module_name}.{param}:{shard}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} does not match any model parameter.")
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)}."
                )
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        self._check_all_loaded(params, modules, loaded)

    def _stacked_target(self, name: str):
        parts = name.split(".")
        if len(parts) < 2:
            return None
        module_part, param = parts[-2], parts[-1]
        if module_part not in self.stacked_params:
            return None
        fused, shard = self.stacked_params[module_part]
        return ".".join(parts[:-2] + [fused]), shard, param

    def _check_all_loaded(self, params: dict, modules: dict, loaded: set[str]) -> None:
        missing = []
        # Report fused shards by the checkpoint's own names (q_proj, not qkv_proj:q).
        checkpoint_part = {value: key for key, value in self.stacked_params.items()}
        stacked = {fused for fused, _ in self.stacked_params.values()}
        for name in params:
            module_name, _, param = name.rpartition(".")
            module = modules.get(module_name)
            parent, _, fused = module_name.rpartition(".")
            # A fused layer is loaded by shards unless it was loaded whole (Phi-3's qkv_proj) or
            # the checkpoint stores it whole.
            if isinstance(module, MergedLinear) and name not in loaded and fused in stacked:
                missing += [
                    ".".join(filter(None, [parent, checkpoint_part.get((fused, shard), f"{fused}:{shard}"), param]))
                    for shard in module.shard_offsets if f"{module_name}.{param}:{shard}" not in loaded
                ]
            elif isinstance(module, FusedMoE):
                continue  # reported below, by the names the checkpoint would use
            elif name not in loaded and not (self.tie_word_embeddings and name == "lm_head.weight"):
                missing.append(name)
        missing += [f"{module_name}.{tensor}" for module_name, module in modules.items()
                    if isinstance(module, FusedMoE) for tensor in module.missing_checkpoint_tensors()]
        if missing:
            missing = [self.checkpoint_name(name) for name in missing]
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")


def _owning_module(name: str, owners: dict[str, nn.Module]) -> str | None:
    """The name of the module in ``owners`` that ``name`` lies under, if any."""
    module_name = name
    while owners and "." in module_name:
        module_name = module_name.rpartition(".")[0]
        if module_name in owners:
            return module_name
    return None
