"""Paged-attention kernel benchmark: decode bandwidth against the GPU's copy bandwidth.

    python -m octavo.benchmarks.attention_bench            # on a CUDA machine
    python -m octavo.benchmarks.attention_bench --tiny     # smoke run (TRITON_INTERPRET=1 on CPU)

Decode attention is memory bound, so its figure of merit is the bandwidth it reaches (bytes of
K/V read plus query read and output written, per second) relative to what a plain
device-to-device copy of a 2 GiB buffer achieves on the same GPU in the same run.
Shapes follow Qwen3-0.6B: 16 query heads, 8 KV heads, head_dim 128, bf16, block size 16.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from octavo.layers.attention import triton_ops as ops


def _time_ms(fn: Callable[[], None], device: torch.device, warmup: int, iters: int,
             use_graph: bool = True) -> float:
    """Median milliseconds per call of ``fn``.

    On CUDA the calls are replayed from a CUDA graph when possible so that Python launch overhead
    does not hide the kernel time of short calls; each sample is timed with CUDA events.
    """
    for _ in range(warmup):  # includes Triton JIT compilation
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    run = fn
    if use_graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except RuntimeError as exc:  # pragma: no cover - fall back to eager launches
            print(f"  (CUDA graph capture failed, timing eager launches: {exc})")
            run = fn
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _make_decode_inputs(num_seqs: int, context: int, num_q_heads: int, num_kv_heads: int,
                        head_dim: int, block_size: int, dtype: torch.dtype,
                        device: torch.device) -> dict:
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                           device=device)
    # Shuffled physical blocks, as the block allocator produces after a while.
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = block_tables.view(num_seqs, blocks_per_seq).contiguous()
    query = torch.randn(num_seqs, num_q_heads, head_dim, dtype=dtype, device=device)
    return {
        "out": torch.empty_like(query), "query": query, "kv_cache": kv_cache,
        "block_tables": block_tables,
        "seq_lens": torch.full((num_seqs,), context, dtype=torch.int32, device=device),
        "scale": head_dim ** -0.5,
    }


def bench_decode(num_seqs: int, context: int, device: torch.device, warmup: int, iters: int,
                 num_splits: int | None = None, num_q_heads: int = 16, num_kv_heads: int = 8,
                 head_dim: int = 128, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(median ms, GB/s) of paged_decode_attention for ``num_seqs`` contexts of ``context``."""
    args = _make_decode_inputs(num_seqs, context, num_q_heads, num_kv_heads, head_dim,
                               block_size, dtype, device)
    ms = _time_ms(lambda: ops.paged_decode_attention(**args, num_splits=num_splits), device,
                  warmup, iters)
    elem = args["query"].element_size()
    kv_bytes = 2 * num_seqs * context * num_kv_heads * head_dim * elem
    qo_bytes = 2 * num_seqs * num_q_heads * head_dim * elem
    return ms, (kv_bytes + qo_bytes) / (ms * 1e6)


def bench_copy(device: torch.device, warmup: int, iters: int, nbytes: int) -> tuple[float, float]:
    """(median ms, GB/s) of a device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = _time_ms(lambda: dst.copy_(src), device, warmup, iters, use_graph=False)
    return ms, 2 * nbytes / (ms * 1e6)


def bench_prefill(num_seqs: int, prompt: int, device: torch.device, warmup: int, iters: int,
                  num_q_heads: int = 16, num_kv_heads: int = 8, head_dim: int = 128,
                  block_size: int = 16, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(median ms, TFLOP/s) of causal paged_prefill_attention over fresh prompts."""
    dec = _make_decode_inputs(num_seqs, prompt, num_q_heads, num_kv_heads, head_dim, block_size,
                              dtype, device)
    query = torch.randn(num_seqs * prompt, num_q_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(query)
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=device) * prompt
    ms = _time_ms(lambda: ops.paged_prefill_attention(
        out, query, dec["kv_cache"], dec["block_tables"], qsl, dec["seq_lens"], prompt,
        dec["scale"]), device, warmup, iters)
    # Two matmuls (QK^T, PV) of 2 flops per multiply-add over the causal half of the scores.
    flops = 4 * num_seqs * num_q_heads * head_dim * prompt * (prompt + 1) / 2
    return ms, flops / (ms * 1e9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, runs anywhere the kernels run (checks the script only)")
    args = parser.parse_args(argv)

    if args.tiny:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        iters, warmup = 2, 1
        batch_case, long_case, prefill_case = (4, 64), (1, 256), (2, 64)
        copy_bytes = 1 << 20
        split_options = [1, 4, None]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("attention_bench needs a CUDA GPU (or --tiny)")
        device = torch.device("cuda")
        iters, warmup = args.iters, args.warmup
        batch_case, long_case, prefill_case = (256, 1024), (1, 32768), (4, 2048)
        copy_bytes = 2 << 30
        split_options = [1, 8, 16, 32, 64, None]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; qwen3-0.6b shapes: 16 q heads, 8 kv heads, head_dim 128, bf16, "
          "block 16")

    copy_ms, copy_gbs = bench_copy(device, warmup, iters, copy_bytes)
    print(f"d2d copy {copy_bytes / 2**30:.3g} GiB: {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s "
          "(read+write)")

    sms = ops._device_sms(device)
    for num_seqs, context in (batch_case, long_case):
        auto = ops._auto_num_splits(num_seqs, 8, context, sms, ops.DECODE_BLOCK_N)
        print(f"decode {num_seqs} x {context} tokens (auto num_splits={auto}):")
        options = split_options if num_seqs == 1 else [None]
        for splits in options:
            ms, gbs = bench_decode(num_seqs, context, device, warmup, iters, num_splits=splits)
            label = "auto" if splits is None else str(splits)
            print(f"  num_splits={label:>4}: {ms * 1e3:9.1f} us, {gbs:7.0f} GB/s, "
                  f"{gbs / copy_gbs:6.1%} of copy bandwidth")

    num_seqs, prompt = prefill_case
    ms, tflops = bench_prefill(num_seqs, prompt, device, warmup, max(1, iters // 4))
    print(f"prefill {num_seqs} x {prompt} tokens (causal): {ms:.3f} ms, {tflops:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
