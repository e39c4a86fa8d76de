"""What every model class provides to the model runner, and shared weight loading."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from octavo.layers.attention import Attention, AttentionMetadata
from octavo.layers.linear import Linear
from octavo.layers.moe import FusedMoE
from octavo.layers.vocab_embedding import VocabParallelEmbedding


class CausalLM(nn.Module):
    """Base for decoder-only models over a flat token batch.

    Subclasses set ``stacked_params``: checkpoint sub-module name -> (fused module
    name, shard), e.g. ``"q_proj": ("qkv_proj", "q")``, and ``ignored_weights``:
    name fragments of checkpoint tensors that carry nothing we need.
    """

    stacked_params: dict[str, tuple[str, str]] = {}
    # The class builds its layers split across tensor-parallel ranks (octavo.worker.parallel_state).
    supports_tensor_parallel: bool = False
    ignored_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)
    tie_word_embeddings: bool = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits in the model's dtype; consumers upcast only what they need (a greedy argmax
        on bfloat16 picks the same token as on its exact float32 copy). Under tensor
        parallelism only rank 0 gets them (``None`` elsewhere)."""
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
        """Copy checkpoint tensors in, fusing shards; fail loudly on anything missing or unknown.
        Linear layers take their tensors through their quantization method, then repack."""
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
            module_name, shard, param = self._linear_target(name)
            module = modules.get(module_name)
            if isinstance(module, Linear):
                try:
                    module.load_shard(shard, param, tensor)
                except ValueError as error:
                    raise ValueError(f"checkpoint tensor {checkpoint_name!r}: {error}") from error
                continue
            if isinstance(module, VocabParallelEmbedding) and param == "weight":
                try:
                    module.load_weight(tensor)
                except ValueError as error:
                    raise ValueError(f"checkpoint tensor {checkpoint_name!r} {error}") from None
                loaded.add(name)
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
        self.process_after_loading()

    def process_after_loading(self) -> None:
        """Let every linear layer repack its weight for its kernels (after loading or dummy init)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_after_loading()

    def _linear_target(self, name: str) -> tuple[str, str, str]:
        """(module name, shard, tensor name): ``...q_proj.weight`` -> (``...qkv_proj``, ``q``, ``weight``)."""
        module_name, _, param = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        if leaf in self.stacked_params:
            fused, shard = self.stacked_params[leaf]
            return ".".join(filter(None, [parent, fused])), shard, param
        return module_name, "", param

    def _check_all_loaded(self, params: dict, modules: dict, loaded: set[str]) -> None:
        missing = []
        # Report fused shards by the checkpoint's own names (q_proj, not qkv_proj:q).
        checkpoint_part = {value: key for key, value in self.stacked_params.items()}
        stacked = {fused for fused, _ in self.stacked_params.values()}
        # Linear layers and experts keep their own account of what arrived.
        self_tracked = set()
        for module_name, module in modules.items():
            if isinstance(module, FusedMoE):
                self_tracked.update(f"{module_name}.{param}" for param, _ in module.named_parameters())
                missing += [f"{module_name}.{tensor}" for tensor in module.missing_checkpoint_tensors()]
                continue
            if not isinstance(module, Linear):
                continue
            self_tracked.update(f"{module_name}.{param}" for param, _ in module.named_parameters())
            if self.tie_word_embeddings and module is getattr(self, "lm_head", None):
                continue
            parent, _, leaf = module_name.rpartition(".")
            absent = module.missing_tensors()
            if leaf not in stacked:  # the checkpoint stores the layer whole, even a fused one
                missing += dict.fromkeys(".".join(filter(None, [parent, leaf, param])) for _, param in absent)
                continue
            for shard, param in absent:
                part = checkpoint_part.get((leaf, shard), f"{leaf}:{shard}") if shard else leaf
                missing.append(".".join(filter(None, [parent, part, param])))
        missing += [name for name in params if name not in loaded and name not in self_tracked]
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
