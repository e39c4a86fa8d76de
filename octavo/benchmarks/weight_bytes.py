"""How many bytes a model's weights take in octavo, per weight format, without a GPU.

    python -m octavo.benchmarks.weight_bytes --model dummy:llama3-8b --quantization auto gptq awq

Builds the model as the engine does (its quantized linear layers included) with uninitialised
weights on the CPU, so nothing is computed and the memory pages are never touched, and sums
every parameter, as the engine's own "weights" figure does: quantized linears (packed weights,
scales, zero points, group indices), embeddings and LM head, and the rest (norms, biases);
tables computed at start-up (rotary cos/sin) are not weights. The figure is the same on any
device: nothing is repacked or duplicated when the weights move to the GPU.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

from octavo.benchmarks.throughput import _model_path
from octavo.model_loader import loader


def _part(name: str) -> str:
    if "embed" in name or "wte" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "proj" in name or "qweight" in name or "scales" in name or "zeros" in name or "g_idx" in name:
        return "linears"
    return "other"


def weight_bytes(model: str, quantization: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of the model's weights by part (``linears``, ``embeddings``, ``lm_head``, ``other``)
    and in ``total``."""
    with _model_path(model, quantization) as (path, _):
        folder = Path(path)
        hf_config = loader.load_hf_config(folder)
        model_class = loader.resolve_model_class(hf_config)
        quant_config = loader.quantization_for_model(model_class, hf_config, quantization, dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cpu"):
                built = model_class(hf_config, max_position=2048,
                                    **({} if quant_config is None else {"quant_config": quant_config}))
        finally:
            torch.set_default_dtype(previous)
    parts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()  # tied embeddings and LM head are one tensor
    for name, tensor in built.named_parameters():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        parts[_part(name)] += tensor.numel() * tensor.element_size()
    parts["total"] = sum(parts.values())
    return dict(parts)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dummy:llama3-8b", help="a dummy:NAME or a model folder")
    parser.add_argument("--quantization", nargs="+", default=["auto", "gptq"],
                        help="weight formats to size (auto: the checkpoint's own; gptq/awq: 4-bit group 128)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"model": args.model, "formats": {}}
    print(f"{'format':<8} {'total GB':>9} {'GiB':>6} {'linears':>8} {'embed':>6} {'lm_head':>8} {'other':>6}")
    for quantization in args.quantization:
        parts = weight_bytes(args.model, quantization)
        report["formats"][quantization] = parts
        print(f"{quantization:<8} {parts['total'] / 1e9:9.2f} {parts['total'] / 2**30:6.2f} "
              f"{parts.get('linears', 0) / 1e9:8.2f} {parts.get('embeddings', 0) / 1e9:6.2f} "
              f"{parts.get('lm_head', 0) / 1e9:8.2f} {parts.get('other', 0) / 1e9:6.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
