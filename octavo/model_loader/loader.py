"""Turn a model path into (HF config, model with weights, tokenizer).

A model is a Hugging Face folder (config.json, safetensors, tokenizer files) or
a GGUF file. ``load_format="dummy"`` gives random weights for a real config,
which is all a throughput benchmark needs.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from octavo.layers.linear import Linear
from octavo.layers.sharded_init import fill_normal
from octavo.layers.moe.layer import FusedMoE
from octavo.layers.vocab_embedding import VocabParallelEmbedding
from octavo.layers.quantization import QuantizationConfig, resolve_quantization
from octavo.models.base import CausalLM
from octavo.models.registry import resolve_model_class, stand_in_config

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def is_gguf(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic, whatever its name (``.bin`` GGUFs exist).
    Reads 4 bytes and needs no ``gguf`` package, so folders load where it is not installed."""
    file = Path(path).expanduser()
    try:
        with open(file, "rb") as handle:
            return file.is_file() and handle.read(4) == b"GGUF"
    except (OSError, TypeError, ValueError):
        return False


def check_model_path(model: str, load_format: str = "auto") -> Path:
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: pass a local Hugging Face model folder (with config.json) or a .gguf "
            "file. Models are never downloaded."
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    check_load_format(path, load_format)
    return path


def check_load_format(path: Path, load_format: str) -> None:
    """A model file must be a GGUF, and ``load_format="gguf"`` must name one."""
    if path.is_dir():
        if load_format == "gguf":
            raise ValueError(f"load_format='gguf' needs a GGUF file, but {path} is a folder.")
        return
    if not is_gguf(path):
        raise ValueError(
            f"{path} is a file but not a GGUF file (it does not start with b'GGUF'); pass a GGUF file or a "
            "Hugging Face model folder (with config.json)."
        )
    if load_format not in ("auto", "gguf", "dummy"):
        raise ValueError(
            f"{path} is a GGUF file, which load_format={load_format!r} cannot read; use 'auto' or 'gguf'."
        )


def load_hf_config(path: Path):
    if is_gguf(path):
        from octavo.model_loader.gguf_loader import load_gguf_config

        return load_gguf_config(path)
    from transformers import AutoConfig

    try:
        stand_in = stand_in_config(json.loads((path / "config.json").read_text()))
        if stand_in is not None:
            return stand_in
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as error:
        raise ValueError(f"could not read {path / 'config.json'}: {error}") from error


def checkpoint_dtype(hf_config) -> Optional[torch.dtype]:
    dtype = getattr(hf_config, "dtype", None)  # transformers 5 name (torch_dtype is deprecated)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def derive_max_model_len(hf_config, requested: Optional[int]) -> int:
    """The user's ``max_model_len``, checked against what the model was trained for."""
    limits = [getattr(hf_config, name) for name in _LENGTH_FIELDS if getattr(hf_config, name, None)]
    model_limit = min(limits) if limits else None
    if requested is None:
        if model_limit is None:
            raise ValueError("the model config gives no maximum length; pass max_model_len.")
        return model_limit
    if model_limit is not None and requested > model_limit:
        raise ValueError(
            f"max_model_len ({requested}) exceeds the model's maximum context ({model_limit}); "
            f"use max_model_len <= {model_limit}."
        )
    return requested


def build_model(
    path: Path,
    hf_config,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    load_format: str = "auto",
    allow_pickle_weights: bool = False,
    seed: int = 0,
    quantization: Optional[str] = "auto",
    gguf_weights: str = "float32",
) -> CausalLM:
    """``quantization``: ``auto`` follows config.json's ``quantization_config``; a format name must
    match it (``fp8`` may also quantize a 16-bit checkpoint at load); ``none`` refuses quantized ones."""
    check_load_format(path, load_format)  # callers other than the engine may not have checked
    model_class = resolve_model_class(hf_config)
    quant_config = quantization_for_model(model_class, hf_config, quantization, dtype)
    extra = {} if quant_config is None else {"quant_config": quant_config}
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(hf_config, max_position=max_model_len, **extra)
    finally:
        torch.set_default_dtype(previous_dtype)
    quantized = False  # GGUF weights kept packed
    if load_format == "dummy":
        _init_dummy_weights(model, seed)
        model.process_after_loading()
    elif is_gguf(path):
        from octavo.model_loader.gguf_loader import iter_gguf_weights

        model.load_weights(iter_gguf_weights(path, dtype))
        if _packs_gguf(gguf_weights, device, dtype):
            from octavo.layers.quantization.gguf_cpu import pack_gguf_linears

            quantized = pack_gguf_linears(model, path) > 0
    else:
        from octavo.model_loader.weights import iter_checkpoint

        # pickles can run code when loaded: only the explicit opt-in allows them, never load_format
        model.load_weights(iter_checkpoint(path, allow_pickle_weights))
    if device.type == "cpu" and (quant_config is not None or quantized):
        from octavo.layers.cpu_fused import keep_pytorch_forms

        # Quantized activations or bfloat16 linears: the reference forms' roundings.
        keep_pytorch_forms(model)
    if device.type == "cpu" and dtype == torch.float32:
        from octavo.layers.cpu_linear import prepack_cpu_linears, prepacking_enabled

        if prepacking_enabled():  # OCTAVO_CPU_ONEDNN_LINEAR=0 keeps F.linear everywhere
            prepack_cpu_linears(model)
    return model.eval()


def quantization_for_model(model_class: type[CausalLM], hf_config, quantization: Optional[str],
                           dtype: torch.dtype) -> Optional[QuantizationConfig]:
    """The checkpoint's weight format for this model class, checked against the dtype; ``None``
    for full-precision weights."""
    quant_config = resolve_quantization(hf_config, quantization)
    if quant_config is None:
        return None
    if "quant_config" not in inspect.signature(model_class.__init__).parameters:
        raise ValueError(f"{model_class.__name__} does not support quantized weights yet; load an unquantized checkpoint.")
    quant_config.packed_modules = packed_modules(model_class.stacked_params)
    quant_config.check_dtype(dtype)
    return quant_config


def packed_modules(stacked_params: dict[str, tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """``{"q_proj": ("qkv_proj", "q"), ...}`` -> ``{"qkv_proj": ("q_proj", "k_proj", "v_proj")}``."""
    packed: dict[str, list[str]] = {}
    for checkpoint_name, (fused, _) in stacked_params.items():
        packed.setdefault(fused, []).append(checkpoint_name)
    return {fused: tuple(names) for fused, names in packed.items()}
def _packs_gguf(gguf_weights: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GGUF 4-bit matrices stay in their blocks: asked for, or ``auto`` on a float32 CPU run."""
    from octavo.layers.quantization.gguf_cpu import packed_kernels_available

    if gguf_weights == "packed":
        if device.type != "cpu" or not packed_kernels_available():
            raise ValueError("gguf_weights='packed' runs on the CPU with torch's int4 CPU kernels (torch >= 2.6); "
                             "use gguf_weights='float32' here.")
        return True
    return gguf_weights == "auto" and device.type == "cpu" and dtype == torch.float32 and packed_kernels_available()


@torch.no_grad()
def _init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Small random values: realistic magnitudes keep activations finite in half precision.
    Linear layers and embeddings fill their own parameters (quantized ones in their packed
    format); full-precision ones draw by name, the same weights at any tensor-parallel size."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    self_filled = set()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            module.init_dummy(generator, name, seed)
        elif isinstance(module, (VocabParallelEmbedding, FusedMoE)):
            module.init_dummy(name, seed)
        else:
            continue
        self_filled.update(id(param) for param in module.parameters())
    for name, param in model.named_parameters():
        if id(param) in self_filled:
            continue
        if name.endswith("norm.weight") or ".ln_" in name or name.endswith("ln_f.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            fill_normal(param, name, seed)


def load_tokenizer(path: Path, tokenizer_path: Optional[str]):
    """An HF-compatible tokenizer, or ``None`` when the model ships none."""
    if is_gguf(path) and tokenizer_path is None:
        from octavo.model_loader.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    folder = Path(tokenizer_path).expanduser() if tokenizer_path else path
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        if tokenizer_path:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {folder}.")
        logger.warning("%s has no tokenizer files: only token-id prompts will work, and text is empty.", folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def eos_token_ids(path: Path, hf_config, tokenizer) -> frozenset[int]:
    """Every id that should end generation: generation_config.json, config.json and the tokenizer."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    generation_config = path / "generation_config.json" if path.is_dir() else None
    if generation_config is not None and generation_config.exists():
        add(json.loads(generation_config.read_text()).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return frozenset(ids)
