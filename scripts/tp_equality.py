"""Greedy tokens at tensor_parallel_size 1 and N on one dummy model: the same requests, each
engine in turn, outputs compared token by token. Prints one line, writes JSON.

    python scripts/tp_equality.py --model llama3-8b --tensor-parallel-size 2 --output tp.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from octavo import LLM, SamplingParams
from octavo.benchmarks.workloads import WORKLOADS, build_requests, dummy_config, write_dummy_model


def greedy(folder: Path, size: int, requests, args) -> tuple[list[list[int]], float]:
    llm = LLM(str(folder), dtype=args.dtype, device="cuda", load_format="dummy", skip_tokenizer_init=True,
              max_model_len=2048, max_num_seqs=args.num_prompts, enforce_eager=args.enforce_eager,
              tensor_parallel_size=size, gpu_memory_utilization=0.85)
    prompts = [{"prompt_token_ids": request.prompt_token_ids} for request in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True) for _ in requests]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    llm.shutdown()
    return [output.outputs[0].token_ids for output in outputs], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="dummy model shape, e.g. llama3-8b, qwen3-0.6b")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="float32 keeps reduction-order rounding off the argmax")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    folder = write_dummy_model(args.model, Path(tempfile.mkdtemp(prefix="tp-equality-")))
    spec = WORKLOADS["fixed"].with_overrides(num_prompts=args.num_prompts, prompt_len=(16, 512))
    requests = build_requests(spec, dummy_config(args.model).vocab_size)
    single, single_s = greedy(folder, 1, requests, args)
    split, split_s = greedy(folder, args.tensor_parallel_size, requests, args)
    equal = sum(a == b for a, b in zip(single, split))
    # Where outputs differ, how far they agree: a late split is reduction-order rounding on a near tie.
    first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                        for a, b in zip(single, split) if a != b]
    result = dict(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                  enforce_eager=args.enforce_eager, num_prompts=len(requests), max_tokens=args.max_tokens,
                  identical=equal, first_difference=first_difference, tp1_seconds=round(single_s, 2),
                  tpn_seconds=round(split_s, 2))
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"{args.model:<12} {args.dtype:<8} TP=1 vs TP={args.tensor_parallel_size}"
          f"{' eager' if args.enforce_eager else ''}: {equal}/{len(requests)} identical; first differences at "
          f"{first_difference or '-'}; generate {single_s:.1f}s vs {split_s:.1f}s")


if __name__ == "__main__":
    main()
