"""What KV sharing saves: parallel samples vs independent requests, and prefix caching on vs off.

    python -m octavo.benchmarks.sharing [--model PATH | dummy:qwen3-0.6b] [--device auto] [--output results.json]

Part 1 runs each prompt with ``n`` samples (blocks shared, copy-on-write) and
again as ``n`` independent requests (prefix caching off, so nothing is shared),
recording the peak number of KV blocks in use and the output tokens per second.
``--kv-blocks`` caps the cache, where sharing pays in throughput too: independent
requests then wait or get preempted for memory. Part 2 runs requests that share
a long system prompt with prefix caching on and off, counting the prefill
tokens actually computed and timing both.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

from octavo import LLM, SamplingParams
from octavo.benchmarks.workloads import write_dummy_model


def peak_blocks(llm: LLM, prompts: list[dict], params) -> tuple[int, float]:
    """Generate; the pool's peak used-block count (sampled before every step) and the seconds taken."""
    engine = llm.llm_engine
    peak = 0
    original = engine.core.runner.launch

    def spy(batch, tables, previous=None):
        nonlocal peak
        peak = max(peak, engine.core.kv_cache.pool.num_used_blocks)
        return original(batch, tables, previous)

    engine.core.runner.launch = spy
    try:
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
    finally:
        engine.core.runner.launch = original
    return peak, elapsed


def parallel_sampling(llm: LLM, vocab: int, num_prompts: int, prompt_len: int, output_len: int,
                      widths: list[int]) -> list[dict]:
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(prompt_len)]}
               for _ in range(num_prompts)]
    llm.generate(prompts[:1], SamplingParams(n=2, max_tokens=2), use_tqdm=False)  # warm-up (kernel compilation)
    rows = []
    for n in widths:
        shared, shared_s = peak_blocks(llm, prompts, SamplingParams(n=n, temperature=1.0, seed=1,
                                                                    max_tokens=output_len, ignore_eos=True))
        independent, independent_s = peak_blocks(
            llm, [p for p in prompts for _ in range(n)],
            SamplingParams(temperature=1.0, seed=1, max_tokens=output_len, ignore_eos=True))
        output_tokens = num_prompts * n * output_len
        rows.append({"n": n, "peak_blocks_shared": shared, "peak_blocks_independent": independent,
                     "saving_percent": 100.0 * (1 - shared / independent),
                     "output_tok_s_shared": output_tokens / shared_s,
                     "output_tok_s_independent": output_tokens / independent_s})
    return rows


def shared_prefix(model: str, common: dict, vocab: int, num_requests: int, prefix_len: int, suffix_len: int,
                  output_len: int) -> list[dict]:
    rng = random.Random(1)
    system = [rng.randrange(10, vocab) for _ in range(prefix_len)]
    prompts = [{"prompt_token_ids": system + [rng.randrange(10, vocab) for _ in range(suffix_len)]}
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    rows = []
    outputs = {}
    for caching in (False, True):
        llm = LLM(model, enable_prefix_caching=caching, **common)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        llm.llm_engine.core.kv_cache.pool.reset_prefix_cache()
        engine = llm.llm_engine
        computed_before = engine.core.num_prefill_tokens_computed
        started = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - started
        outputs[caching] = [r.outputs[0].token_ids for r in results]
        total_tokens = sum(len(p["prompt_token_ids"]) + output_len for p in prompts)
        rows.append({
            "prefix_caching": caching,
            "prefill_tokens_computed": engine.core.num_prefill_tokens_computed - computed_before,
            "cached_prompt_tokens": sum(r.num_cached_tokens for r in results),
            "seconds": elapsed,
            "requests_per_s": num_requests / elapsed,
            "total_tokens_per_s": total_tokens / elapsed,
        })
        del llm, engine
    # On a GPU in bf16 a cached prefix is not bit-identical to a recomputed one (different batch shapes,
    # different rounding), so near-tied greedy choices can flip; in float32 they match exactly.
    rows[1]["num_same_outputs_as_uncached"] = sum(a == b for a, b in zip(outputs[True], outputs[False]))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="HF folder, GGUF, or dummy:<name> (random weights, e.g. dummy:qwen3-0.6b; "
                             "default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--num-prompts", type=int, default=8, help="part 1: prompts")
    parser.add_argument("--prompt-len", type=int, default=500, help="part 1: prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="part 1: tokens per sample")
    parser.add_argument("--num-requests", type=int, default=200, help="part 2: requests")
    parser.add_argument("--prefix-len", type=int, default=1000, help="part 2: shared prefix tokens")
    parser.add_argument("--suffix-len", type=int, default=24, help="part 2: unique tokens per request")
    parser.add_argument("--prefix-output-len", type=int, default=16, help="part 2: tokens per request")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="part 1: cap the KV cache at this many blocks (default: sized from memory)")
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)

    from octavo.model_loader.default_model import default_model_path

    model = args.model or str(default_model_path())
    # The figures are read inside the core (block counts), so it runs in this process.
    common = dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, engine_core_process=False)
    if model.startswith("dummy:"):
        model = str(write_dummy_model(model.split(":", 1)[1], Path(tempfile.mkdtemp(prefix="octavo-sharing-"))))
        common["load_format"] = "dummy"
    llm = LLM(model, enable_prefix_caching=False, num_gpu_blocks_override=args.kv_blocks, **common)
    vocab = min(llm.llm_engine.vocab_size, 32000)
    sampling = parallel_sampling(llm, vocab, args.num_prompts, args.prompt_len, args.output_len, [2, 4, 8])
    del llm
    prefix = shared_prefix(model, common, vocab, args.num_requests, args.prefix_len, args.suffix_len,
                           args.prefix_output_len)

    print(f"\nParallel sampling: {args.num_prompts} prompts x {args.prompt_len} tokens, {args.output_len} out")
    print(f"{'n':>3} {'peak blocks, shared':>20} {'peak blocks, independent':>25} {'saving':>8} "
          f"{'out tok/s, shared':>18} {'out tok/s, independent':>23} {'speed-up':>9}")
    for row in sampling:
        speedup = row["output_tok_s_shared"] / row["output_tok_s_independent"]
        print(f"{row['n']:>3} {row['peak_blocks_shared']:>20} {row['peak_blocks_independent']:>25} "
              f"{row['saving_percent']:>7.1f}% {row['output_tok_s_shared']:>18.1f} "
              f"{row['output_tok_s_independent']:>23.1f} {speedup:>8.2f}x")
    print(f"\nShared prefix: {args.num_requests} requests, {args.prefix_len}-token common prefix + "
          f"{args.suffix_len} unique, {args.prefix_output_len} out")
    print(f"{'prefix caching':>15} {'prefill tokens':>15} {'seconds':>9} {'req/s':>8} {'total tok/s':>12}")
    for row in prefix:
        print(f"{'on' if row['prefix_caching'] else 'off':>15} {row['prefill_tokens_computed']:>15} "
              f"{row['seconds']:>9.2f} {row['requests_per_s']:>8.2f} {row['total_tokens_per_s']:>12.1f}")
    print(f"requests with identical outputs with and without caching: "
          f"{prefix[1]['num_same_outputs_as_uncached']} of {args.num_requests}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model": args.model or model, "arguments": vars(args), "parallel_sampling": sampling, "shared_prefix": prefix}, handle, indent=2)


if __name__ == "__main__":
    main()
