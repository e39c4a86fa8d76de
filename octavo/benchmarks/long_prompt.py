"""One long prompt on the CPU: prefill time beside transformers, peak memory, and the time to
first token of a short request that arrives while the long prompt is being prefilled.

    python -m octavo.benchmarks.long_prompt [--model PATH] [--prompt-len 8000] [--output results.json]

octavo runs first, in this process: the long prompt alone (its time to first token is the
prefill time), then again with a short request added after the long prompt's first step.
The peak resident memory of those runs, over what the process held before the engine
started, is compared with the model's weights plus the KV cache of a full context. Then
transformers prefills the same prompt with the same weights (``generate`` of one token,
SDPA attention). Both in float32 with torch's threads.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path
from typing import Optional

import torch

SHORT_PROMPT_LEN = 16
SHORT_NEW_TOKENS = 4


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _time_to_first_token(engine, request_id: str, prompt: list[int], max_tokens: int,
                         then: Optional[tuple[str, list[int]]] = None) -> dict[str, float]:
    """Seconds from adding each request to its first token; ``then`` is added after one step."""
    from octavo.sampling_params import SamplingParams

    added = {request_id: time.perf_counter()}
    engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                                  ignore_eos=True))
    first: dict[str, float] = {}
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        if steps == 1 and then is not None:
            short_id, short_prompt = then
            added[short_id] = time.perf_counter()
            engine.add_request(short_id, {"prompt_token_ids": short_prompt},
                               SamplingParams(temperature=0.0, max_tokens=SHORT_NEW_TOKENS, ignore_eos=True))
        now = time.perf_counter()
        for output in outputs:
            if output.request_id not in first and output.outputs[0].token_ids:
                first[output.request_id] = now - added[output.request_id]
    return first


def run_long_prompt_benchmark(model: Optional[str] = None, prompt_len: int = 8000, seed: int = 0,
                              gguf_weights: str = "auto") -> dict:
    from octavo.benchmarks.cpu_batch import hf_model_from
    from octavo.llm import LLM
    from octavo.model_loader.default_model import default_model_path
    from octavo.model_loader.loader import load_hf_config
    from octavo.worker.kv_cache_memory import bytes_per_block

    path = model or str(default_model_path())
    baseline_rss = _peak_rss_bytes()
    # A KV cache for one full context plus the short request: the memory figure then compares
    # what the run needs with what it holds, not with a generous default budget.
    config = load_hf_config(Path(path))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = bytes_per_block(config.num_hidden_layers, 1, config.num_key_value_heads, head_dim, torch.float32)
    max_model_len = prompt_len + SHORT_PROMPT_LEN + SHORT_NEW_TOKENS
    llm = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=max_model_len,
              kv_cache_memory=kv_per_token * (max_model_len + 64), gguf_weights=gguf_weights)
    engine = llm.llm_engine
    rng = random.Random(seed)
    vocab = min(engine.vocab_size, 32000)
    prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
    short = [rng.randrange(10, vocab) for _ in range(SHORT_PROMPT_LEN)]
    _time_to_first_token(engine, "warm-up", short, 2)
    alone = _time_to_first_token(engine, "long", prompt, 1)
    # Another prompt of the same length (no prefix-cache hit), with a short request arriving.
    prompt_b = [rng.randrange(10, vocab) for _ in range(prompt_len)]
    together = _time_to_first_token(engine, "long-b", prompt_b, 1, then=("short", short))
    octavo_peak = _peak_rss_bytes() - baseline_rss

    model_bytes = sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()])
    kv_bytes = sum(cache.numel() * cache.element_size() for cache in engine.runner.kv_caches)
    full_context_kv = kv_per_token * engine.max_model_len
    settings = {"max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
                "long_prefill_token_threshold": engine.scheduler.long_prefill_token_threshold,
                "attention_backend": engine.runner.backend.name, "gguf_weights": gguf_weights}
    del llm, engine

    hf = hf_model_from(path)
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        hf.generate(torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long),
                    generation_config=config)
        started = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        hf_s = time.perf_counter() - started
    return {
        "model": path, "prompt_len": prompt_len, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "octavo_prefill_s": alone["long"], "octavo_prefill_with_short_s": together["long-b"], "hf_prefill_s": hf_s,
        "short_ttft_s": together["short"], "peak_rss_over_baseline_bytes": octavo_peak,
        "model_bytes": model_bytes, "kv_bytes": full_context_kv, "kv_cache_allocated_bytes": kv_bytes, **settings,
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: the embedded model)")
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--gguf-weights", default="auto", choices=("auto", "packed", "float32"),
                        help="octavo's GGUF weights: auto (packed on CPU), packed, or float32 (the reference)")
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    report = run_long_prompt_benchmark(args.model, args.prompt_len, gguf_weights=args.gguf_weights)
    gib = 1 << 30
    print(f"{args.prompt_len}-token prompt, float32 activations, GGUF weights {args.gguf_weights}, "
          f"{report['threads']} threads, torch {report['torch']}")
    print(f"prefill: octavo {report['octavo_prefill_s']:.1f} s, transformers {report['hf_prefill_s']:.1f} s "
          f"(octavo / transformers {report['octavo_prefill_s'] / report['hf_prefill_s']:.2f})")
    print(f"a {SHORT_PROMPT_LEN}-token request arriving during the prefill: first token after "
          f"{report['short_ttft_s']:.2f} s (the long prompt then took {report['octavo_prefill_with_short_s']:.1f} s)")
    limit = 2 * (report["model_bytes"] + report["kv_bytes"])
    print(f"peak memory over start: {report['peak_rss_over_baseline_bytes'] / gib:.2f} GiB; 2 x (model "
          f"{report['model_bytes'] / gib:.2f} + full-context KV {report['kv_bytes'] / gib:.2f}) = {limit / gib:.2f} GiB")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
