"""The float32 CPU fast paths against the reference paths, in one process, engines taking turns.

    python -m octavo.benchmarks.cpu_fast_paths [--batch-sizes 8 32 64] [--prompt-len 128] [--new-tokens 128]

Two engines on the default model decoded to float32: one built with ``OCTAVO_CPU_ONEDNN_LINEAR=0``,
``OCTAVO_CPU_PAGED_DECODE=0`` and ``OCTAVO_CPU_FUSED_OPS=0`` (``F.linear``, gather + SDPA, the
PyTorch RMSNorm / SiLU), one with all on (oneDNN linears with reordered weights and MKL's packed
GEMM for full 64-row batches, the paged decode kernel, the fused kernels). Per batch size the same random
prompts, greedy, EOS ignored; the faster of two turns counts. Prints output tok/s of each, the
ratio, and the share of requests whose greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Optional

from octavo import LLM, SamplingParams


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF or HF folder (default: the embedded model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    from octavo.model_loader.default_model import default_model_path

    path = args.model or str(default_model_path())
    llms = {}
    for name, switch in (("reference", "0"), ("fast", "1")):
        os.environ["OCTAVO_CPU_ONEDNN_LINEAR"] = switch  # read when the model and backend are built
        os.environ["OCTAVO_CPU_PAGED_DECODE"] = switch
        os.environ["OCTAVO_CPU_FUSED_OPS"] = switch
        llms[name] = LLM(path, device="cpu", dtype="float32", max_model_len=args.prompt_len + args.new_tokens,
                         max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False, gguf_weights="float32")
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    for llm in llms.values():  # warm-up (and the kernel build, the first time on a machine)
        llm.generate([{"prompt_token_ids": [5] * 8}], SamplingParams(max_tokens=4), use_tqdm=False)
    for batch in args.batch_sizes:
        prompts = [{"prompt_token_ids": [rng.randrange(10, 32000) for _ in range(args.prompt_len)]}
                   for _ in range(batch)]
        best: dict[str, float] = {}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(2):
            for name, llm in llms.items():
                started = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                rate = batch * args.new_tokens / (time.perf_counter() - started)
                best[name] = max(best.get(name, 0.0), rate)
                tokens[name] = [list(o.outputs[0].token_ids) for o in outputs]
        same = sum(a == b for a, b in zip(tokens["fast"], tokens["reference"])) / batch
        print(f"batch {batch}: reference {best['reference']:.1f} tok/s, fast {best['fast']:.1f} tok/s "
              f"({best['fast'] / best['reference']:.2f}x); greedy identical {same:.0%}", flush=True)


if __name__ == "__main__":
    main()
