"""Quantized weights: which format a model's linear layers use, from its config or the user.

``resolve_quantization`` turns ``quantization_config`` (config.json) and the ``quantization``
option into one ``QuantizationConfig``, or ``None`` for full-precision weights.
"""

from __future__ import annotations

from typing import Any, Optional

from octavo.layers.quantization.awq import AWQConfig
from octavo.layers.quantization.base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod
from octavo.layers.quantization.compressed_tensors import CompressedTensorsConfig
from octavo.layers.quantization.fp8 import Fp8Config
from octavo.layers.quantization.gptq import GPTQConfig

QUANTIZATION_CONFIGS: dict[str, type[QuantizationConfig]] = {
    config.name: config for config in (AWQConfig, CompressedTensorsConfig, Fp8Config, GPTQConfig)
}
# What ``quantization=`` accepts besides the format names.
QUANTIZATION_OPTIONS = ("auto", "none")

__all__ = ["LinearMethod", "QuantizationConfig", "UnquantizedLinearMethod", "QUANTIZATION_CONFIGS",
           "QUANTIZATION_OPTIONS", "check_quantization_option", "resolve_quantization"]


def _supported() -> str:
    return ", ".join(sorted(QUANTIZATION_CONFIGS))


def check_quantization_option(quantization: Optional[str]) -> None:
    """ValueError for a ``quantization`` value that names no format."""
    known = (*QUANTIZATION_OPTIONS, *QUANTIZATION_CONFIGS)
    if quantization is not None and quantization not in known:
        raise ValueError(
            f"quantization={quantization!r} is not supported; use auto (read config.json), none, or one of: "
            f"{_supported()}."
        )


def resolve_quantization(hf_config, quantization: Optional[str] = "auto") -> Optional[QuantizationConfig]:
    """The checkpoint's format (``auto``), checked against an explicit choice; ``fp8`` on a
    16-bit checkpoint quantizes it at load; ``none`` refuses a quantized checkpoint."""
    check_quantization_option(quantization)
    checkpoint = _checkpoint_quantization(hf_config)
    if checkpoint is None:
        if quantization == "fp8":
            return Fp8Config.online()
        if quantization not in (None, "auto", "none"):
            raise ValueError(
                f"quantization={quantization!r} needs a checkpoint quantized in that format, but config.json "
                "has no quantization_config; only fp8 can quantize a 16-bit checkpoint at load."
            )
        return None
    method = str(checkpoint.get("quant_method", "")).lower()
    if method not in QUANTIZATION_CONFIGS:
        raise ValueError(
            f"quantization method {method or '(none given)'!r} (config.json quantization_config.quant_method) is "
            f"not supported; supported methods: {_supported()}."
        )
    if quantization == "none":
        raise ValueError(f"the checkpoint is quantized ({method}); quantization='none' cannot load it. Use auto.")
    if quantization not in (None, "auto") and quantization != method:
        raise ValueError(
            f"quantization={quantization!r} does not match the checkpoint's quantization_config.quant_method "
            f"({method!r}); use auto or {method}."
        )
    return QUANTIZATION_CONFIGS[method].from_config(checkpoint)


def _checkpoint_quantization(hf_config) -> Optional[dict[str, Any]]:
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return config
