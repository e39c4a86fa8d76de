"""Decode-step cost of one decoder layer's projections, quantized against bfloat16.

    python -m octavo.benchmarks.quant_linear [--model llama3-8b] [--output results.json]
    python -m octavo.benchmarks.quant_linear --summarize bf16.json fp8.json gptq.json

For each token count, the four projections of one layer (fused q/k/v, o, fused gate/up, down)
run back to back inside a CUDA graph, as decode steps do, in bfloat16, W4A16 (GPTQ layout,
group 128; as the layer runs it, then its fused kernel and dequantize-then-cuBLAS each alone),
FP8 W8A8 and INT8 W8A8; the table gives
microseconds per layer and the speed-up over bfloat16. ``--summarize`` puts the octavo rows of several
``bench throughput`` JSON files (one per weight format) side by side, the first as the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from octavo.benchmarks.workloads import DUMMY_MODELS, dummy_config
from octavo.layers.linear import Linear
from octavo.layers.quantization.base import LinearMethod, QuantizationConfig
from octavo.layers.quantization.fp8 import Fp8Config
from octavo.layers.quantization.gptq import GPTQConfig
from octavo.layers.quantization.int8 import Int8LinearMethod
from octavo.layers.quantization.wna16 import WNA16LinearMethod

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class _Int8Config(QuantizationConfig):
    """INT8 W8A8 for every layer (checkpoints reach it through compressed-tensors)."""

    name = "int8"

    def linear_method(self, prefix: str) -> LinearMethod:
        return Int8LinearMethod(static_activations=False)


def layer_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    hidden, inner = hf_config.hidden_size, hf_config.intermediate_size
    return {"qkv_proj": (hidden, q + 2 * kv), "o_proj": (q, hidden), "gate_up_proj": (hidden, 2 * inner),
            "down_proj": (inner, hidden)}


def build_layers(shapes: dict[str, tuple[int, int]], quant_config: Optional[QuantizationConfig],
                 device: torch.device) -> list[Linear]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            layers = [Linear(k, n, bias=False, quant_config=quant_config, prefix=f"model.layers.0.{name}")
                      for name, (k, n) in shapes.items()]
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            layer.init_dummy(generator)
            layer.process_after_loading()
    return layers


def time_graph(step: Callable[[], None], replays: int = 20) -> float:
    """Microseconds per call of ``step``, captured ten times into one CUDA graph."""
    for _ in range(3):
        step()  # compile, tune and settle allocations outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * 10)


def run(model: str, tokens: list[int], device: torch.device) -> dict:
    shapes = layer_shapes(dummy_config(model))
    variants = {
        "bf16": build_layers(shapes, None, device),
        "w4a16": build_layers(shapes, GPTQConfig(4, 128, False, True, False, False, []), device),
        "fp8": build_layers(shapes, Fp8Config.online(), device),
        "int8": build_layers(shapes, _Int8Config(), device),
    }
    hidden_in = {name: k for name, (k, _) in shapes.items()}
    fused_max_tokens = WNA16LinearMethod.fused_max_tokens
    rows = []
    for count in tokens:
        inputs = {name: torch.randn(count, k, device=device, dtype=torch.bfloat16) for name, k in hidden_in.items()}
        row = {"tokens": count}
        for variant, layers in variants.items():
            row[variant] = time_graph(
                lambda layers=layers: [layer(inputs[name]) for layer, name in zip(layers, inputs)])
        # each W4A16 path alone at this size (the layer takes the faster, up to the switch)
        method = variants["w4a16"][0].quant_method  # one method object serves every layer of the config
        for path in ("fused", "dequantize"):
            method.fused_max_tokens, method.paths = 1 << 30, (path,)
            try:
                row[f"w4a16_{path}"] = time_graph(
                    lambda: [layer(inputs[name]) for layer, name in zip(variants["w4a16"], inputs)])
            finally:
                del method.fused_max_tokens, method.paths  # back to the class defaults
        rows.append(row)
    weight_bytes = {variant: sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
                    for variant, layers in variants.items()}
    return {"model": model, "device": torch.cuda.get_device_name(device), "shapes": shapes,
            "weight_bytes_per_layer": weight_bytes, "fused_max_tokens": fused_max_tokens, "rows": rows}


def format_table(result: dict) -> str:
    from octavo.layers.quantization.triton_kernels import DEQUANTIZE_MIN_TOKENS

    lines = [f"{result['model']} one decoder layer's projections on {result['device']}, microseconds "
             f"(W4A16: its fused kernel below {DEQUANTIZE_MIN_TOKENS} tokens, the faster of it and dequantize + "
             f"cuBLAS up to {result['fused_max_tokens']}, dequantize + cuBLAS above; then each alone)",
             f"{'tokens':>6} {'bf16':>9} {'w4a16':>9} {'x bf16':>7} {'fused':>9} {'dequant':>9} {'fp8':>9} "
             f"{'x bf16':>7} {'int8':>9} {'x bf16':>7}"]
    for row in result["rows"]:
        lines.append(f"{row['tokens']:>6} {row['bf16']:>9.1f} {row['w4a16']:>9.1f} {row['bf16'] / row['w4a16']:>6.2f}x "
                     f"{row['w4a16_fused']:>9.1f} {row['w4a16_dequantize']:>9.1f} "
                     f"{row['fp8']:>9.1f} {row['bf16'] / row['fp8']:>6.2f}x "
                     f"{row['int8']:>9.1f} {row['bf16'] / row['int8']:>6.2f}x")
    return "\n".join(lines)


def summarize_throughput(paths: list[str]) -> str:
    """One line per throughput JSON: weight format, output tok/s (and against the first), weight
    bytes, and the fraction of the limit computed with those bytes."""
    lines = [f"{'weights':<20} {'output tok/s':>12} {'vs first':>8} {'weight GB':>9} {'GiB':>6} {'limit tok/s':>11} "
             f"{'fraction of limit':>17}"]
    baseline = None
    for path in paths:
        octavo = next(e for e in json.loads(Path(path).read_text())["engines"] if e["engine"] == "octavo")
        baseline = baseline or octavo["output_tok_s"]
        bound = "-" if octavo["bound_output_tok_s"] is None else f"{octavo['bound_output_tok_s']:,.0f}"
        fraction = "-" if octavo["fraction_of_bound"] is None else f"{octavo['fraction_of_bound']:.3f}"
        lines.append(f"{octavo['quantization']:<20} {octavo['output_tok_s']:>12,.0f} "
                     f"{octavo['output_tok_s'] / baseline:>7.2f}x {octavo['weight_bytes'] / 1e9:>9.2f} "
                     f"{octavo['weight_bytes'] / 2**30:>6.2f} {bound:>11} "
                     f"{fraction:>17}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(DUMMY_MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--output", "-o", default=None, help="write the figures to this JSON file")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                        help="instead: compare the octavo rows of these bench throughput results")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize_throughput(args.summarize))
        return 0
    if not torch.cuda.is_available():
        print("quant_linear needs a CUDA GPU.", file=sys.stderr)
        return 2
    result = run(args.model, args.tokens, torch.device("cuda"))
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
