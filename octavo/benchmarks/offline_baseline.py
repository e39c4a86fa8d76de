"""Offline ``LLM.generate`` on the requests of a ``bench serve`` report, and the served/offline table.

    python -m octavo.benchmarks.offline_baseline serve.json --model FOLDER [engine flags] -o offline.json

The server's job is to add almost nothing to the engine. This rebuilds the requests of each
rate-inf run in the report (same workload, vocabulary and seed), runs them offline with the
same engine options and the model's tokenizer loaded (so both sides detokenize), timed like the
served run from the first submission to the last completion after the same warm-up, and prints,
per served run, request and output throughput, served/offline (rate inf only: a finite rate
caps throughput at the arrivals), median TPOT and p99 TTFT. Stop the server first: the two
engines would otherwise share the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from octavo.benchmarks.workloads import Request, WorkloadSpec, build_requests, warmup_requests
from octavo.entrypoints.cli import add_engine_arguments, engine_kwargs


def _spec(workload: dict[str, Any]) -> WorkloadSpec:
    return WorkloadSpec(workload["name"], workload["num_prompts"], tuple(workload["prompt_len"]),
                        tuple(workload["output_len"]))


def run_offline(llm, requests: list[Request], warmup: list[Request]) -> dict[str, Any]:
    """Warm up, then time ``requests`` submitted at once; every output must have its requested length."""
    from octavo.sampling_params import SamplingParams

    def generate(batch: list[Request]):
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in batch]
        return llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in batch], params, use_tqdm=False)

    if warmup:
        generate(warmup)
    started = time.perf_counter()
    outputs = generate(requests)
    elapsed = time.perf_counter() - started
    counts = [len(output.outputs[0].token_ids) for output in outputs]
    wrong = sum(1 for count, r in zip(counts, requests) if count != r.output_len)
    if wrong:
        raise RuntimeError(f"offline: {wrong} request(s) got another number of tokens than asked for.")
    prompt_tokens = sum(r.prompt_len for r in requests)
    return {"num_requests": len(requests), "duration_s": elapsed, "output_tokens": sum(counts),
            "request_throughput": len(requests) / elapsed, "output_throughput": sum(counts) / elapsed,
            "total_throughput": (prompt_tokens + sum(counts)) / elapsed,
            "detokenized": llm.get_tokenizer() is not None}


def compare(served: dict[str, Any], offline: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per served run; ``offline`` maps a seed to its offline result."""
    rows = []
    for run in served["runs"]:
        base = offline.get(run["seed"]) if run["request_rate"] == "inf" else None
        rows.append({
            "request_rate": run["request_rate"], "failed": run["failed"],
            "served_request_throughput": run["request_throughput"],
            "served_output_throughput": run["output_throughput"],
            "offline_output_throughput": base["output_throughput"] if base else None,
            "served_over_offline": run["output_throughput"] / base["output_throughput"] if base else None,
            "median_tpot_ms": (run["tpot_ms"] or {}).get("median"), "p99_ttft_ms": (run["ttft_ms"] or {}).get("p99"),
        })
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    def number(value: Optional[float], form: str) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)

    header = ["rate", "failed", "served req/s", "served out tok/s", "offline out tok/s", "served/offline",
              "median TPOT ms", "p99 TTFT ms"]
    table = [header] + [[row["request_rate"], str(row["failed"]), number(row["served_request_throughput"], ".2f"),
                         number(row["served_output_throughput"], ",.0f"),
                         number(row["offline_output_throughput"], ",.0f"), number(row["served_over_offline"], ".3f"),
                         number(row["median_tpot_ms"], ",.1f"), number(row["p99_ttft_ms"], ",.1f")]
                        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("served", help="the JSON written by `octavo bench serve --output`")
    add_engine_arguments(parser)
    parser.add_argument("--output", "-o", default=None, help="write the offline figures and the table here")
    parser.add_argument("--skip-tokenizer-too", action="store_true",
                        help="also run the same requests with skip_tokenizer_init=True (token ids only), to show "
                             "what detokenization costs offline")
    args = parser.parse_args(argv)
    served = json.loads(Path(args.served).read_text())
    if served["meta"]["prompt_format"] != "ids":
        raise SystemExit("error: compare a run that sent token ids (--prompt-format ids); offline sends ids.")
    workload = served["workload"]
    spec = _spec(workload)
    seeds = sorted({run["seed"] for run in served["runs"] if run["request_rate"] == "inf"})
    offline: dict[int, dict[str, Any]] = {}
    if seeds:
        from octavo.llm import LLM

        llm = LLM(**engine_kwargs(args))
        for seed in seeds:
            requests = build_requests(spec, workload["vocab_size"], seed)
            warmup = warmup_requests(requests, workload["vocab_size"], seed, count=workload.get("num_warmups", 4))
            print(f"offline: {len(requests)} requests (seed {seed})...", file=sys.stderr)
            offline[seed] = run_offline(llm, requests, warmup)
        llm.shutdown()
    undetokenized: dict[int, dict[str, Any]] = {}
    if seeds and args.skip_tokenizer_too:
        llm = LLM(**engine_kwargs(args), skip_tokenizer_init=True)
        for seed in seeds:
            requests = build_requests(spec, workload["vocab_size"], seed)
            warmup = warmup_requests(requests, workload["vocab_size"], seed, count=workload.get("num_warmups", 4))
            undetokenized[seed] = run_offline(llm, requests, warmup)
            ratio = offline[seed]["output_throughput"] / undetokenized[seed]["output_throughput"]
            print(f"offline seed {seed}: tokenizer loaded {offline[seed]['output_throughput']:,.0f} out tok/s, "
                  f"skip_tokenizer_init {undetokenized[seed]['output_throughput']:,.0f}: ratio {ratio:.3f}")
        llm.shutdown()
    rows = compare(served, offline)
    print(format_comparison(rows))
    if not seeds:
        print("(no rate-inf run in the report: no offline figure to compare with)")
    if args.output:
        Path(args.output).write_text(json.dumps({"offline": {str(k): v for k, v in offline.items()},
                                                 "offline_skip_tokenizer": {str(k): v for k, v in undetokenized.items()},
                                                 "comparison": rows}, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
