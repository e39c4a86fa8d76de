"""Where a step's time goes: scheduling, input preparation, the forward pass, sampling, bookkeeping.

    python -m octavo.benchmarks.step_profile --model dummy:qwen3-0.6b --num-prompts 512

Runs the ``fixed`` workload with asynchronous scheduling, unbracketed, to show how much of
each step the host spends waiting for the device (near 0: the host is the bottleneck); then
again with every phase bracketed by device synchronisation, so each phase's wall time is its
own (this slows the run; use it to find overhead, not to quote throughput), and the GPU kernel
time of one decode step and one mixed step from the PyTorch profiler.
``--host-profile N`` runs only that pipelined pass, under cProfile, and prints the N
functions with the most host time of their own.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch

from octavo import LLM, SamplingParams
from octavo.benchmarks.workloads import WORKLOADS, build_requests, write_dummy_model

PHASES = ("schedule", "prepare", "forward", "sample", "total")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(name: str, function: Callable, totals: dict, device: torch.device) -> Callable:
    def wrapper(*args, **kwargs):
        _sync(device)
        started = time.perf_counter()
        result = function(*args, **kwargs)
        _sync(device)
        totals[name] += time.perf_counter() - started
        return result

    return wrapper


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:qwen3-0.6b")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="only the pipelined pass, under cProfile; print the top N functions by own time")
    parser.add_argument("--pipelined-only", action="store_true", help=argparse.SUPPRESS)  # the second pass
    args = parser.parse_args(argv)

    workload = WORKLOADS["fixed"].with_overrides(num_prompts=args.num_prompts)
    model = args.model
    if model.startswith("dummy:"):
        model = str(write_dummy_model(model.split(":", 1)[1], Path(tempfile.mkdtemp(prefix="octavo-profile-"))))
    requests = build_requests(workload, 151936, seed=0)
    max_len = max(r.prompt_len + r.output_len for r in requests)
    if args.pipelined_only:
        _pipelined_wait_share(model, args, requests, max_len)
        return
    if args.host_profile:
        profiler = cProfile.Profile()
        _pipelined_wait_share(model, args, requests, max_len, profiler)
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(args.host_profile)
        stats.sort_stats("cumulative").print_stats("octavo", args.host_profile)  # which of octavo's calls hold it
        return
    # The pipelined pass first, in a process of its own that has given the GPU back when it ends
    # (an engine's memory is not reliably released while its interpreter lives).
    command = [sys.executable, "-m", "octavo.benchmarks.step_profile", "--pipelined-only", "--model", args.model,
               "--num-prompts", str(args.num_prompts), "--max-num-seqs", str(args.max_num_seqs),
               "--device", args.device] + (["--enforce-eager"] if args.enforce_eager else [])
    subprocess.run(command, check=True)
    llm = LLM(model, load_format="dummy" if args.model.startswith("dummy:") else "auto", device=args.device,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
              skip_tokenizer_init=True, async_scheduling=False, engine_core_process=False)  # phases timed one after another
    engine = llm.llm_engine
    device = engine.device
    totals: dict[str, float] = defaultdict(float)
    engine.core.scheduler.schedule = _timed("schedule", engine.core.scheduler.schedule, totals, device)
    engine.core.runner.prepare_inputs = _timed("prepare", engine.core.runner.prepare_inputs, totals, device)
    engine.core.runner.sampler.sample = _timed("sample", engine.core.runner.sampler.sample, totals, device)
    if engine.core.runner.decode_graphs is not None:
        engine.core.runner.decode_graphs.run = _timed("forward", engine.core.runner.decode_graphs.run, totals, device)
    engine.core.model.forward = _timed("forward", engine.core.model.forward, totals, device)

    for index, request in enumerate(requests):
        engine.add_request(str(index), {"prompt_token_ids": request.prompt_token_ids},
                           SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True))
    decode: dict[str, float] = defaultdict(float)
    mixed: dict[str, float] = defaultdict(float)
    decode_steps = mixed_steps = 0
    profiled_decode = profiled_prefill = False
    while engine.has_unfinished_requests():
        totals.clear()
        batch_is_decode = all(seq.num_computed_tokens == seq.num_tokens - 1 for seq in engine.core.scheduler.running) \
            and not engine.core.scheduler.waiting and engine.core.scheduler.running
        full_batch = len(engine.core.scheduler.running) == args.max_num_seqs
        profile_decode = batch_is_decode and not profiled_decode and full_batch
        # A mixed step late in the run: a prefill chunk beside hundreds of decoding sequences.
        profile_prefill = (not batch_is_decode and not profiled_prefill
                           and len(engine.core.scheduler.running) >= args.max_num_seqs // 2)
        if device.type == "cuda" and (profile_decode or profile_prefill):
            profiled_decode |= profile_decode
            profiled_prefill |= profile_prefill
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                engine.step()
                _sync(device)
            averages = prof.key_averages()
            kernel_us = sum(e.self_device_time_total for e in averages)
            label = "decode step" if profile_decode else "step with prefill"
            print(f"one {label} ({len(engine.core.scheduler.running)} running): GPU kernel time {kernel_us / 1e3:.2f} ms")
            for event in sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:8]:
                print(f"  {event.self_device_time_total / 1e3:8.2f} ms  {event.count:5d}x  {event.key[:90]}")
            continue
        _sync(device)
        started = time.perf_counter()
        engine.step()
        _sync(device)
        totals["total"] = time.perf_counter() - started
        target = decode if batch_is_decode else mixed
        for name in PHASES:
            target[name] += totals[name]
        if batch_is_decode:
            decode_steps += 1
        else:
            mixed_steps += 1

    print(f"{'steps':<22}" + "".join(f"{name:>11}" for name in PHASES) + f"{'other':>11}")
    for label, table, steps in (("decode-only", decode, decode_steps), ("with prefill", mixed, mixed_steps)):
        if not steps:
            continue
        other = table["total"] - sum(table[name] for name in PHASES if name != "total")
        row = "".join(f"{table[name] / steps * 1e3:>9.2f}ms" for name in PHASES)
        print(f"{label + f' ({steps})':<22}{row}{other / steps * 1e3:>9.2f}ms")



def _pipelined_wait_share(model: str, args: argparse.Namespace, requests, max_len: int,
                          profiler: Optional[cProfile.Profile] = None) -> None:
    """Run the workload with asynchronous scheduling; time spent blocked on the device's tokens."""
    llm = LLM(model, load_format="dummy" if args.model.startswith("dummy:") else "auto", device=args.device,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
              skip_tokenizer_init=True, async_scheduling=True, engine_core_process=False)
    engine = llm.llm_engine
    waited = 0.0
    launch = engine.core.runner.launch

    def timed_launch(*launch_args):
        launched = launch(*launch_args)
        wait = launched.wait

        def timed_wait():
            nonlocal waited
            started = time.perf_counter()
            result = wait()
            waited += time.perf_counter() - started
            return result

        launched.wait = timed_wait
        return launched

    engine.core.runner.launch = timed_launch
    for index, request in enumerate(requests):
        engine.add_request(str(index), {"prompt_token_ids": request.prompt_token_ids},
                           SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True),
                           stream=False)
    steps = 0
    _sync(engine.device)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - started
    print(f"asynchronous scheduling: {steps} steps in {elapsed:.2f} s, {elapsed / steps * 1e3:.2f} ms per step, "
          f"of which {waited / steps * 1e3:.2f} ms waiting for the device ({waited / elapsed:.0%})")


if __name__ == "__main__":
    main()
