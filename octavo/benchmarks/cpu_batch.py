"""CPU throughput of the default model beside HF transformers, at several batch sizes.

    python -m octavo.benchmarks.cpu_batch [--model PATH] [--batch-sizes 1 8 32] [--output results.json]

Both engines run the same weights in float32 on the CPU: octavo loads the model
itself; transformers gets a ``LlamaForCausalLM`` built from the same config with
the same dequantized tensors. Each request has random prompt tokens and
generates a fixed number of tokens (EOS ignored); tokens/s counts generated
tokens only. The numbers of threads are the same for both (torch's default).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Optional

import torch

from octavo import LLM, SamplingParams


def hf_model_from(path: str):
    """A transformers model holding exactly the weights octavo loads (GGUF or HF folder)."""
    from transformers import AutoModelForCausalLM

    from octavo.model_loader.loader import is_gguf, load_hf_config

    if not is_gguf(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from octavo.model_loader.gguf_loader import iter_gguf_weights

    config = load_hf_config(path)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dict(iter_gguf_weights(path, torch.float32)), strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise RuntimeError(f"weights do not fit the HF model: missing {missing}, unexpected {unexpected}")
    if missing:
        model.tie_weights()
    return model


def time_hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    inputs = torch.tensor(prompts)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return time.perf_counter() - started


def time_octavo(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return elapsed


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: the embedded model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)

    from octavo.model_loader.default_model import default_model_path

    path = args.model or str(default_model_path())
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=args.prompt_len + args.new_tokens,
              max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False)
    hf = hf_model_from(path)
    vocab = min(llm.llm_engine.vocab_size, 32000)
    rng = random.Random(0)
    warmup = [[rng.randrange(10, vocab) for _ in range(8)]]
    time_hf(hf, warmup, 4)
    time_octavo(llm, warmup, 4)
    rows = []
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        generated = batch * args.new_tokens
        hf_s = time_hf(hf, prompts, args.new_tokens)
        octavo_s = time_octavo(llm, prompts, args.new_tokens)
        rows.append({"batch": batch, "hf_tok_s": generated / hf_s, "octavo_tok_s": generated / octavo_s,
                     "ratio": hf_s / octavo_s})
        print(f"batch {batch:>3}: HF {generated / hf_s:8.1f} tok/s   octavo {generated / octavo_s:8.1f} tok/s   "
              f"{hf_s / octavo_s:5.2f}x", flush=True)
    print(f"model {path}; {args.prompt_len} prompt + {args.new_tokens} new tokens per request; "
          f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model": path, "rows": rows, "threads": torch.get_num_threads()}, handle, indent=2)


if __name__ == "__main__":
    main()
