"""The cost of structured output: the same requests with and without a JSON schema, one run.

    python -m octavo.benchmarks.structured --model dummy:qwen3-0.6b --num-prompts 256 --output OUT.json

The constrained requests run first, greedy, up to ``--max-tokens``; the unconstrained ones then
generate exactly as many tokens each (EOS ignored), so both runs do the same work apart from
the grammar. Reports output tok/s of both and their ratio, with the engine core where it runs
by default (its own process on CUDA), and a step profile of the constrained run: the host time
of each bitmask fill against the core's step time (the fill runs while the device computes the
forward pass, so it costs nothing while it is shorter than the step). The profile needs the
core in this process: when it runs in its own, the constrained requests run once more with
``engine_core_process=False`` for it (``--no-profile`` skips that).

A ``dummy:`` model has random weights and no tokenizer: a byte-level BPE tokenizer with about
the model's vocabulary is trained on generated text so that the grammar engine works over a
vocabulary of realistic size (the mask cost grows with it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from octavo import LLM, SamplingParams
from octavo.benchmarks.throughput import _model_path, _timed_calls
from octavo.model_loader import loader

# Bounded everywhere, so that even random weights close the object within a few hundred tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 8},
        "status": {"enum": ["open", "closed", "pending"]},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                   "admin": {"type": "boolean"}},
                  "required": ["name", "admin"]},
    },
    "required": ["id", "title", "tags", "scores", "status", "owner"],
}


def train_tokenizer(folder: Path, vocab_size: int, seed: int = 0) -> None:
    """A byte-level BPE of ``vocab_size`` tokens trained on generated words and JSON, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = [c + v + e for c in "bcdfghjklmnpqrstvwxyz" for v in "aeiou" for e in ("", "n", "r", "s", "t", "l")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400_000)]
    snippets = ['{"name": "x", "age": 42}', "[1, 2, 3]", "true false null", "0123456789", '", "', '": "', "\n\n"]
    lines = [" ".join(words[i:i + 20]) + rng.choice(".,!?:;") + rng.choice(snippets) for i in range(0, len(words), 20)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>").save_pretrained(folder)


def _prompts(num_prompts: int, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, min(vocab_size, 32000)) for _ in range(rng.randint(100, 512))]}
            for _ in range(num_prompts)]


def _run(llm: LLM, prompts: list, params: list[SamplingParams]) -> tuple[float, list[int], dict[str, list[float]], list]:
    """Seconds, output lengths, the step profile (empty lists across processes) and the outputs."""
    core = llm.llm_engine.core
    if core is None:
        fills, steps = [], []
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
    else:
        with _timed_calls(core.runner.bitmask_filler, "fill") as fills, _timed_calls(core, "step") as steps:
            started = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - started
    return elapsed, [len(o.outputs[0].token_ids) for o in outputs], {"fill": fills, "step": steps}, outputs


def _start(folder: Path, load_format: str, args: argparse.Namespace, engine_core_process: Optional[bool],
           vocab: int) -> LLM:
    """The engine, warmed up: grammar compile, the mask kernel, CUDA graphs for both kinds of step."""
    llm = LLM(str(folder), load_format=load_format, device=args.device, max_num_seqs=args.num_prompts,
              max_model_len=1024, seed=0, engine_core_process=engine_core_process)
    warm = _prompts(8, vocab, args.seed + 1)
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=16, structured_outputs={"json": SCHEMA}),
                 use_tqdm=False)
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    return llm


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    return {"mean": 1e3 * statistics.fmean(ordered), "p50": 1e3 * ordered[len(ordered) // 2],
            "p99": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with _model_path(args.model) as (path, load_format):
        folder = Path(path)
        hf_config = loader.load_hf_config(folder)
        if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
            started = time.perf_counter()
            train_tokenizer(folder, min(hf_config.vocab_size, args.tokenizer_vocab))
            print(f"trained a {min(hf_config.vocab_size, args.tokenizer_vocab)}-token tokenizer in "
                  f"{time.perf_counter() - started:.1f}s")
        vocab = hf_config.vocab_size
        llm = _start(folder, load_format, args, None, vocab)
        in_process = llm.llm_engine.core is not None
        prompts = _prompts(args.num_prompts, vocab, args.seed)
        constrained = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured_outputs={"json": SCHEMA})
                       ] * len(prompts)

        seconds_c, lengths, profile_c, outputs = _run(llm, prompts, constrained)
        valid = sum(_parses(o.outputs[0].text) for o in outputs if o.outputs[0].finish_reason == "stop")
        plain = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        seconds_u, lengths_u, profile_u, _ = _run(llm, prompts, plain)
        assert lengths_u == lengths, "the unconstrained run must generate the same tokens per request"
        if not in_process and args.profile:
            llm.shutdown()  # frees the device for the profiling engine
            llm = _start(folder, load_format, args, False, vocab)
            _, _, profile_c, _ = _run(llm, prompts, constrained)
        tokens = sum(lengths)
        report = {
            "model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "engine_core_process": not in_process,
            "num_prompts": args.num_prompts, "output_tokens": tokens,
            "finished_by_grammar": sum(o.outputs[0].finish_reason == "stop" for o in outputs),
            "valid_json_of_finished": valid,
            "constrained_tok_s": tokens / seconds_c, "unconstrained_tok_s": tokens / seconds_u,
            "ratio": seconds_u / seconds_c,
            # The core's steps in this process (the constrained run repeated there, if need be).
            "step_ms": {"constrained": _ms(profile_c["step"]),
                        "unconstrained": _ms(profile_u["step"]) if in_process else None},
            "fill_ms": _ms(profile_c["fill"]),
            "num_steps": {"constrained": len(profile_c["step"]),
                          "unconstrained": len(profile_u["step"]) if in_process else None},
        }
        llm.shutdown()
    return report


def _parses(text: str) -> bool:
    try:
        json.loads(text, strict=False)
    except json.JSONDecodeError:
        return False
    return True


def format_report(report: dict[str, Any]) -> str:
    step_c, step_u, fill = report["step_ms"]["constrained"], report["step_ms"]["unconstrained"], report["fill_ms"]
    steps = report["num_steps"]

    def profile(step: Optional[dict[str, float]], count: Optional[int]) -> str:
        return f"{step['mean']:.2f} / {step['p99']:.2f} | {count}" if step is not None and count else "- | -"

    where = "its own process" if report["engine_core_process"] else "this process"
    return "\n".join([
        f"{report['model']} on {report['device']}, engine core in {where}: {report['num_prompts']} requests, "
        f"{report['output_tokens']} output tokens each run ({report['finished_by_grammar']} closed their JSON, "
        f"{report['valid_json_of_finished']} of those parse)",
        "| run | output tok/s | core step ms mean / p99 (in process) | steps |",
        "|---|---|---|---|",
        f"| unconstrained | {report['unconstrained_tok_s']:,.0f} | {profile(step_u, steps['unconstrained'])} |",
        f"| json schema | {report['constrained_tok_s']:,.0f} | {profile(step_c, steps['constrained'])} |",
        f"constrained / unconstrained: {report['ratio']:.3f} (target >= 0.90); bitmask fill per step "
        f"{fill['mean']:.2f} ms mean, {fill['p99']:.2f} ms p99 (host, overlapped with the forward pass)",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dummy:qwen3-0.6b")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tokenizer-vocab", type=int, default=151_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="with the core in its own process, skip the in-process run that profiles its steps")
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    args = parser.parse_args()
    report = run(args)
    print(format_report(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
