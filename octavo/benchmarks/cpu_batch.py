"""CPU throughput of the default model at several batch sizes, beside transformers, vLLM's CPU
backend and llama.cpp, and the accuracy cost of keeping the GGUF weights quantized.

    python -m octavo.benchmarks.cpu_batch [--model PATH] [--batch-sizes 1 8 32 64]
        [--compare hf,vllm,llama.cpp] [--peer-python vllm=/venvs/vllm/bin/python] [--output results.json]

Every engine runs the same requests: per batch size, ``batch`` random prompts of
``--prompt-len`` tokens, each generating ``--new-tokens`` tokens greedily (EOS ignored), all
submitted at once after an untimed warm-up; tokens/s counts generated tokens over the whole
call, the fastest of ``--repeats`` runs (engines in this process take turns). octavo runs twice per batch: ``float32`` (the GGUF decoded to float32, the reference) and
``packed`` (the 4-bit blocks kept, see ``octavo.layers.quantization.gguf_cpu``). transformers
gets a model built from the same config with the same float32 tensors; vLLM a Hugging Face
folder written from them (float32); llama.cpp the GGUF itself, one request after another (its
figures are batch 1). Threads: torch's default for everything in this process, the same number
for the peers. Greedy agreement is counted against octavo's float32 tokens.

The accuracy section scores a held-out paragraph token by token (prompt logprobs) with both
octavo modes and reports the mean and largest difference.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from octavo import LLM, SamplingParams

COMPARE = ("hf", "vllm", "llama.cpp")
HELD_OUT_TEXT = (
    "The committee met on a wet Tuesday in March to decide the fate of the old railway bridge. Some "
    "members wanted it repaired, since the village had grown around it and the farmers still drove their "
    "cattle across it each spring; others argued that the money would be better spent on the school roof, "
    "which had leaked for three winters. After two hours of careful argument they agreed to ask an "
    "engineer for an estimate and to meet again once the numbers were known."
)


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


def time_hf(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    inputs = torch.tensor(prompts)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return time.perf_counter() - started, out[:, inputs.shape[1]:].tolist()


def time_octavo(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(t) == new_tokens for t in tokens)
    return elapsed, tokens


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Share of requests with identical greedy tokens, and the mean share of tokens before the first difference."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                for x, y in zip(tokens, reference)]
    return {"identical": sum(x == y for x, y in zip(tokens, reference)) / len(reference),
            "common_prefix": sum(prefixes) / sum(map(len, reference))}


def held_out_logprobs(llm: LLM, text: str = HELD_OUT_TEXT) -> torch.Tensor:
    output = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids = output.prompt_token_ids
    return torch.tensor([entry[ids[i]].logprob for i, entry in enumerate(output.prompt_logprobs) if entry is not None])


def _parse_compare(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPARE]
    if unknown:
        raise ValueError(f"--compare: unknown engine(s) {', '.join(unknown)}; choose from {', '.join(COMPARE)}.")
    return names


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF or HF folder (default: the embedded model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compare", default="hf", help=f"comma-separated peers from {', '.join(COMPARE)} (default hf)")
    parser.add_argument("--peer-python", action="append", default=[], metavar="[ENGINE=]PATH",
                        help="interpreter of the virtual environment holding a peer, e.g. vllm=/venvs/vllm/bin/python "
                             "(repeat per engine; a bare PATH serves both; default: this interpreter)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per engine and batch size; the fastest counts (default 2: a shared "
                             "machine's bursts of load hit single runs)")
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}.")
    peers = _parse_compare(args.compare)
    from octavo.benchmarks.cpu_peers import parse_peer_pythons

    pythons = parse_peer_pythons(args.peer_python, sys.executable)

    from octavo.benchmarks import cpu_peers
    from octavo.model_loader.default_model import default_model_path
    from octavo.model_loader.loader import is_gguf

    path = args.model or str(default_model_path())
    gguf = is_gguf(path)
    modes = ["float32", "packed"] if gguf else ["float32"]
    threads = torch.get_num_threads()
    rng = random.Random(0)
    vocab = 32000
    rounds = [[[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
              for batch in args.batch_sizes]
    rows: dict[int, dict] = {batch: {"batch": batch} for batch in args.batch_sizes}
    failures: dict[str, str] = {}

    # Peers in their own processes first: nothing else of this run holds memory meanwhile.
    for engine in [peer for peer in peers if peer in cpu_peers.PEER_ENGINES]:
        problem = cpu_peers.peer_importable(engine, pythons[engine])
        if engine == "llama.cpp" and not gguf:
            problem = "llama.cpp needs a GGUF model."
        if problem:
            failures[engine] = problem
            continue
        engine_rounds = [(prompts, [args.new_tokens] * len(prompts)) for prompts in rounds
                         if engine == "vllm" or len(prompts) == 1 for _ in range(args.repeats)]
        if not engine_rounds:
            failures[engine] = "runs one sequence at a time: measured at batch 1 only, and 1 is not among the batch sizes."
            continue
        print(f"running {engine} ({pythons[engine]})...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="octavo-hf-") as folder:
            model = str(cpu_peers.export_hf_folder(path, Path(folder))) if engine == "vllm" and gguf else path
            try:
                results = cpu_peers.run_peer(engine, pythons[engine], model, engine_rounds, threads)
            except (RuntimeError, OSError) as error:
                failures[engine] = str(error)
                continue
        for (prompts, _), result in zip(engine_rounds, results):
            best = rows[len(prompts)].get(engine)
            if best is None or result.output_tok_s > best["tok_s"]:
                rows[len(prompts)][engine] = {"tok_s": result.output_tok_s, "version": result.version,
                                              "tokens": result.token_ids, **result.details}

    llms = {mode: LLM(path, device="cpu", dtype="float32", max_model_len=max(args.prompt_len + args.new_tokens, 256),
                      max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False, gguf_weights=mode)
            for mode in modes}
    hf = hf_model_from(path) if "hf" in peers else None
    warmup = [[rng.randrange(10, vocab) for _ in range(8)]]
    for llm in llms.values():
        time_octavo(llm, warmup, 4)
    if hf is not None:
        time_hf(hf, warmup, 4)
    for batch, prompts in zip(args.batch_sizes, rounds):
        generated = batch * args.new_tokens
        row = rows[batch]
        runners = {f"octavo-{mode}": (time_octavo, llm) for mode, llm in llms.items()}
        if hf is not None:
            runners["hf"] = (time_hf, hf)
        for _ in range(args.repeats):  # engines take turns, so a burst of load does not hit one alone
            for name, (run, engine_model) in runners.items():
                elapsed, tokens = run(engine_model, prompts, args.new_tokens)
                if name not in row or generated / elapsed > row[name]["tok_s"]:
                    row[name] = {"tok_s": generated / elapsed, "tokens": tokens}
        reference = row["octavo-float32"]["tokens"]
        cells = []
        for name, entry in row.items():
            if name == "batch":
                continue
            entry["agreement"] = agreement(entry.pop("tokens"), reference)
            cells.append(f"{name} {entry['tok_s']:7.1f}")
        ratios = [f"octavo-{mode}/{peer} {row[f'octavo-{mode}']['tok_s'] / row[peer]['tok_s']:.2f}"
                  for mode in modes for peer in ("hf", "vllm", "llama.cpp") if peer in row]
        print(f"batch {batch:>3}: " + "  ".join(cells) + " tok/s | " + "  ".join(ratios), flush=True)

    accuracy = None
    if len(llms) == 2:
        reference_lp, packed_lp = (held_out_logprobs(llms[mode]) for mode in ("float32", "packed"))
        difference = (packed_lp - reference_lp).abs()
        same = [row["octavo-packed"]["agreement"] for row in rows.values()]
        accuracy = {"held_out_tokens": len(difference), "mean_abs_logprob_diff": difference.mean().item(),
                    "max_abs_logprob_diff": difference.max().item(),
                    "mean_logprob_float32": reference_lp.mean().item(), "mean_logprob_packed": packed_lp.mean().item(),
                    "greedy_identical_share": sum(a["identical"] for a in same) / len(same)}
        print(f"packed vs float32: held-out text ({len(difference)} tokens) |logprob difference| mean "
              f"{accuracy['mean_abs_logprob_diff']:.4f}, max {accuracy['max_abs_logprob_diff']:.3f}; mean logprob "
              f"{accuracy['mean_logprob_float32']:.3f} -> {accuracy['mean_logprob_packed']:.3f}; greedy tokens "
              f"identical for {accuracy['greedy_identical_share']:.0%} of requests")
    for engine, error in failures.items():
        print(f"{engine}: not run: {error}")
    print(f"model {path}; {args.prompt_len} prompt + {args.new_tokens} new tokens per request; float32 activations; "
          f"{threads} threads; torch {torch.__version__}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model": path, "threads": threads, "torch": torch.__version__, "prompt_len": args.prompt_len,
                       "new_tokens": args.new_tokens, "rows": list(rows.values()), "accuracy": accuracy,
                       "failed": failures}, handle, indent=2)


if __name__ == "__main__":
    main()
