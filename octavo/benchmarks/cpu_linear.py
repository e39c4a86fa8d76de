"""The float32 CPU linears, one form against another, on a model's layer shapes.

    python -m octavo.benchmarks.cpu_linear
    python -m octavo.benchmarks.cpu_linear --rows 1 8 32 64 --hidden 576 --intermediate 1536 --layers 30

Times one decode step's linears (per layer the fused qkv, o, gate/up and down projections;
``--layers`` copies of each, so that, as in a real step, no weight is still in cache when it
comes round again) through ``F.linear`` on the plain weight, oneDNN on its reordered weight,
``cpu_gemm``'s AVX-512 kernel on its packed weight, MKL's packed GEMM at the row count it is
packed for (64), torch's int4 kernel on GGUF-style 4-bit blocks of the same shapes (what a
GGUF model's layers run at few rows, ``gguf_cpu``) and, on CPUs with AMX, oneDNN's bfloat16 GEMM
on the weight rounded to bfloat16 (what they run at more rows there). Random weights and inputs; the fastest of
``--repeats`` passes; every form is checked against ``F.linear`` first. Defaults: SmolLM2-135M
(the embedded default model).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch

from octavo.layers import cpu_gemm, cpu_linear
from octavo.layers.quantization import gguf_cpu


def layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple[int, int]]:
    """(out_features, in_features) of a Llama layer's four linears."""
    return [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * intermediate, hidden),
            (hidden, intermediate)]


def _random_q4(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int4 kernel weight, its bfloat16 scales and zeros, the float32 weight they stand for)."""
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    scale = torch.rand(out_features, in_features // gguf_cpu.GROUP_SIZE) * 0.01
    zero = -8 * scale
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    scale_b, zero_b = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()
    weight = ((q.float() - 8).reshape(out_features, -1, gguf_cpu.GROUP_SIZE) * scale_b[..., None]
              + zero_b[..., None]).reshape(out_features, in_features)
    return gguf_cpu._int4pack(q, 1), scales_zeros, weight


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim)
    weights = [[torch.randn(out, inp) * 0.05 for out, inp in shapes] for _ in range(args.layers)]
    forms: dict[str, Callable[[int, int, torch.Tensor], torch.Tensor]] = {
        "F.linear": lambda layer, j, x: torch.nn.functional.linear(x, weights[layer][j])}
    if cpu_linear.onednn_linear_available():
        onednn = [[torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in layer] for layer in weights]
        forms["oneDNN"] = lambda layer, j, x: torch.ops.mkldnn._linear_pointwise(x, onednn[layer][j], None, "none",
                                                                                  [], "")
    if cpu_gemm.load_gemm():
        packed = [[cpu_gemm.pack(w) for w in layer] for layer in weights]
        forms["AVX-512 GEMM"] = lambda layer, j, x: cpu_gemm.linear(x, packed[layer][j], weights[layer][j].shape[0],
                                                                    None)
    if gguf_cpu.packed_kernels_available():  # GGUF Q4 blocks of the same shapes, random 4-bit values
        int4 = [[_random_q4(out, inp) for out, inp in shapes] for _ in range(args.layers)]
        forms["int4 (GGUF Q4)"] = lambda layer, j, x: gguf_cpu._int4pack_mm(
            x.to(torch.bfloat16), int4[layer][j][0], gguf_cpu.GROUP_SIZE, int4[layer][j][1]).float()
    if gguf_cpu.bfloat16_copy_enabled():  # the GGUF layers' bfloat16 copy (CPUs with AMX), activations rounded too
        bf16 = [[torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), gguf_cpu.BFLOAT16_REORDER_ROWS)
                 for w in layer] for layer in weights]
        forms["bfloat16 (oneDNN)"] = lambda layer, j, x: torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), bf16[layer][j], None, "none", [], "").float()
    mkl = None
    if cpu_linear.mkl_packed_available():
        mkl = [[torch.ops.mkl._mkl_reorder_linear_weight(w, cpu_linear.MKL_PACKED_ROWS) for w in layer]
               for layer in weights]
    print(f"{args.layers} layers of {shapes} (out, in); {torch.get_num_threads()} threads; ms per pass")
    names = list(forms) + (["MKL packed (64 rows)"] if mkl is not None else [])
    print("rows  " + "  ".join(f"{name:>20}" for name in names))
    for rows in args.rows:
        inputs = {inp: torch.randn(rows, inp) for _, inp in shapes}
        row_forms = dict(forms)
        if mkl is not None and rows == cpu_linear.MKL_PACKED_ROWS:
            row_forms["MKL packed (64 rows)"] = lambda layer, j, x: torch.ops.mkl._mkl_linear(
                x, mkl[layer][j], weights[layer][j], None, cpu_linear.MKL_PACKED_ROWS)
        cells = []
        for name in names:
            form = row_forms.get(name)
            if form is None:
                cells.append(f"{'':>20}")
                continue
            for j, (_, inp) in enumerate(shapes):  # correct before fast
                if name.startswith(("int4", "bfloat16")):  # bfloat16 activations: relative error ~2**-8
                    want = torch.nn.functional.linear(inputs[inp], int4[0][j][2] if name.startswith("int4")
                                                      else weights[0][j])
                    assert (form(0, j, inputs[inp]) - want).abs().max() <= 2e-2 * want.abs().max()
                    continue
                want = torch.nn.functional.linear(inputs[inp], weights[0][j])
                torch.testing.assert_close(form(0, j, inputs[inp]), want, atol=1e-4, rtol=1e-4)
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                for layer in range(args.layers):
                    for j, (_, inp) in enumerate(shapes):
                        form(layer, j, inputs[inp])
                best = min(best, time.perf_counter() - started)
            cells.append(f"{best * 1000:>20.1f}")
        print(f"{rows:>4}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
