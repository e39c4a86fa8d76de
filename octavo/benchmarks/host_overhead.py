"""Host time of one decode step: everything the engine does besides running the model.

    python -m octavo.benchmarks.host_overhead --num-seqs 512
    python -m octavo.benchmarks.host_overhead --num-seqs 512 --baseline-rev 97052c8 --baseline-rev main

Scheduling, input preparation, sampling bookkeeping, stop checks and block accounting run
in Python on the host. On a GPU they must fit inside the device time of a step for the
asynchronous scheduler to hide them; this measures them alone, on any machine, by replacing
the model's forward pass and LM head with stubs that return zeros of the right shapes.
The stubbed LM head returns only ``--logits-columns`` columns (16): work over the logits
(argmax, softmax) is device work on a GPU, and on the CPU the argmax over even a 1024-token
vocabulary takes a millisecond at 512 rows, which would drown the bookkeeping this is meant to
show. Prompt token ids still span ``--vocab-size``.

Absolute CPU times vary from one machine to the next, so ``--baseline-rev REV`` checks REV out
into a temporary ``git worktree`` and measures it too, each measurement in a fresh process,
alternating with the current code ``--repeats`` times (the fastest of each is kept), and prints
the ratio. ``--host-profile N`` runs the current code's measurement under cProfile instead.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from octavo import LLM, SamplingParams

# The root this copy of octavo lives in, and the git checkout around it.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _tiny_config(vocab_size: int):
    from transformers import Qwen3Config

    return Qwen3Config(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       vocab_size=vocab_size, max_position_embeddings=4096)


def measure(num_seqs: int, prompt_len: int, steps: int, async_scheduling: bool, vocab_size: int,
            logits_columns: int = 16, profiler: Optional[cProfile.Profile] = None) -> float:
    """Milliseconds of host time per decode step with ``num_seqs`` running sequences.

    Written against the engine before and after the engine-core split (``--baseline-rev`` runs
    it on older checkouts): the core is kept in this process where that is an option.
    """
    from octavo.config import EngineConfig

    folder = Path(tempfile.mkdtemp(prefix="octavo-host-"))
    _tiny_config(vocab_size).save_pretrained(folder)
    extra = ({"engine_core_process": False}
             if "engine_core_process" in {f.name for f in dataclasses.fields(EngineConfig)} else {})
    llm = LLM(str(folder), load_format="dummy", device="cpu", dtype="float32", skip_tokenizer_init=True,
              max_model_len=prompt_len + steps + 16, max_num_seqs=num_seqs, async_scheduling=async_scheduling,
              max_num_batched_tokens=max(8192, num_seqs * prompt_len), **extra)
    engine = llm.llm_engine
    core = getattr(engine, "core", None) or engine  # before the split the engine held the model
    hidden_size = core.model.config.hidden_size
    core.model.forward = lambda input_ids, positions, metadata: torch.zeros(input_ids.shape[0], hidden_size)
    core.model.compute_logits = lambda hidden: torch.zeros(hidden.shape[0], logits_columns)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for index in range(num_seqs):
        engine.add_request(str(index), {"prompt_token_ids": [rng.randrange(10, vocab_size) for _ in range(prompt_len)]},
                           params, stream=False)
    for _ in range(4):  # the prefill, then a few decode steps to settle
        engine.step()
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed / steps * 1e3


def _measure_all(args: argparse.Namespace) -> dict[str, float]:
    """Every (sequences, mode) cell: key ``"512/async"`` -> ms per step."""
    results = {}
    for num_seqs in args.num_seqs:
        for mode in ("plain", "async"):
            results[f"{num_seqs}/{mode}"] = measure(num_seqs, args.prompt_len, args.steps, mode == "async",
                                                    args.vocab_size, args.logits_columns)
    return results


def _measure_in_subprocess(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """This file's measurement run with the ``octavo`` package found under ``root``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--json", "--prompt-len", str(args.prompt_len),
               "--steps", str(args.steps), "--vocab-size", str(args.vocab_size),
               "--logits-columns", str(args.logits_columns),
               "--num-seqs", *map(str, args.num_seqs)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    done = subprocess.run(command, env=env, cwd=root, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _add_worktree(rev: str, folder: Path) -> None:
    try:
        subprocess.run(["git", "-C", str(_SOURCE_ROOT), "worktree", "add", "--detach", str(folder), rev],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"--baseline-rev {rev}: git worktree add failed: {error.stderr.strip()}") from None


def _compare(args: argparse.Namespace) -> None:
    revs = [(rev, subprocess.run(["git", "-C", str(_SOURCE_ROOT), "rev-parse", "--short", rev], check=True,
                                 capture_output=True, text=True).stdout.strip()) for rev in args.baseline_rev]
    scratch = Path(tempfile.mkdtemp(prefix="octavo-baseline-"))
    roots = {"current": _SOURCE_ROOT}
    try:
        for rev, short in revs:
            roots[rev] = scratch / short
            _add_worktree(short, roots[rev])
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):  # alternate, so machine load drifts touch every checkout alike
            for name, root in roots.items():
                for cell, ms in _measure_in_subprocess(root, args).items():
                    best.setdefault(name, {})[cell] = min(ms, best.get(name, {}).get(cell, float("inf")))
    finally:
        for rev in args.baseline_rev:
            if rev in roots:
                subprocess.run(["git", "-C", str(_SOURCE_ROOT), "worktree", "remove", "--force", str(roots[rev])],
                               capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"host ms per decode step, fastest of {args.repeats} runs each; ratio = current / baseline")
    header = f"{'sequences':>9}  {'mode':>5}  {'current':>8}"
    for rev, short in revs:
        header += f"  {short:>9}  {'ratio':>6}"
    print(header)
    for cell in best["current"]:
        num_seqs, mode = cell.split("/")
        line = f"{num_seqs:>9}  {mode:>5}  {best['current'][cell]:>8.2f}"
        for rev, _ in revs:
            line += f"  {best[rev][cell]:>9.2f}  {best['current'][cell] / best[rev][cell]:>6.3f}"
        print(line)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--logits-columns", type=int, default=16, help="width of the stubbed logits")
    parser.add_argument("--baseline-rev", action="append", default=[], metavar="REV",
                        help="also measure git revision REV (repeatable) and print current / REV")
    parser.add_argument("--repeats", type=int, default=3, help="with --baseline-rev: runs of each checkout")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="profile the async decode steps at the largest --num-seqs; print the top N by own time")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one line of results (subprocesses)
    args = parser.parse_args(argv)
    if args.host_profile:
        profiler = cProfile.Profile()
        measure(max(args.num_seqs), args.prompt_len, args.steps, True, args.vocab_size, args.logits_columns, profiler)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.host_profile)
        return
    if args.json:
        print(json.dumps(_measure_all(args)))
        return
    if args.baseline_rev:
        _compare(args)
        return
    results = _measure_all(args)
    print(f"{'sequences':>9}  {'plain steps':>12}  {'async steps':>12}   (host ms per decode step)")
    for num_seqs in args.num_seqs:
        print(f"{num_seqs:>9}  {results[f'{num_seqs}/plain']:>12.2f}  {results[f'{num_seqs}/async']:>12.2f}")


if __name__ == "__main__":
    main()
