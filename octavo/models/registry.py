"""Hugging Face ``architectures`` names -> model classes."""

from __future__ import annotations

from typing import Optional

from octavo.models.base import CausalLM
from octavo.models.block_families import (
    BloomForCausalLM,
    FalconForCausalLM,
    GPTBigCodeForCausalLM,
    GPTJForCausalLM,
    PhiForCausalLM,
)
from octavo.models.gpt2 import GPT2LMHeadModel
from octavo.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    # Dense families on the Llama decoder (config switches) and on the LayerNorm block decoder.
    "GemmaForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "AquilaForCausalLM": LlamaForCausalLM,
    "PhiForCausalLM": PhiForCausalLM,
    "GPTJForCausalLM": GPTJForCausalLM,
    "GPTBigCodeForCausalLM": GPTBigCodeForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
    "BloomForCausalLM": BloomForCausalLM,
}

# Model types published with their own (remote) code but shaped exactly like a Llama: their
# config.json is read as a LlamaConfig, never through AutoConfig, which would ask to run that code.
_LLAMA_SHAPED_REMOTE_TYPES = frozenset({"aquila"})


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def stand_in_config(config_dict: dict) -> Optional[object]:
    """A transformers config for a known remote-code model type, else ``None``."""
    if config_dict.get("model_type") in _LLAMA_SHAPED_REMOTE_TYPES:
        from transformers import LlamaConfig

        return LlamaConfig.from_dict(config_dict)
    return None


def resolve_model_class(config) -> type[CausalLM]:
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in _REGISTRY:
            return _REGISTRY[name]
    shown = ", ".join(architectures) if architectures else "none listed in config.json"
    raise ValueError(
        f"model architecture ({shown}) is not supported. Supported architectures: "
        f"{', '.join(supported_architectures())}."
    )
