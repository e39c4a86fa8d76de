"""Hugging Face ``architectures`` names -> model classes."""

from __future__ import annotations

from octavo.models.base import CausalLM
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
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


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
