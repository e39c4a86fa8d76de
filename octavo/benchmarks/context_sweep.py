"""``octavo bench context-sweep``: find a server's context limit the way a user does.

    octavo bench context-sweep --base-url http://127.0.0.1:8000 --step 2000 --output sweep.json

The prompt grows by ``--step`` tokens per request (fresh random ids each time, so the prefix
cache never shortens a prefill) until the server refuses one. Each step prints prompt tokens,
generated tokens, their total, seconds, time to first token and output tokens per second. The
refusal must be a 400 and, when the server states its ``max_model_len`` in /v1/models, come
exactly there: the longest prompt that fits (``max_model_len - output_len``) is then sent and
must succeed, one token more must get 400. Last, a short request and /health show whether the
server still serves. The exit status is 0 only if all of that held.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from octavo.benchmarks.serve import (
    Target,
    add_server_arguments,
    import_pyplot_figure,
    open_session,
    resolve_target,
    run_async,
    send_request,
)
from octavo.benchmarks.workloads import WorkloadSpec, build_requests

# The request that checks the server still serves after the refusal.
_PROBE_PROMPT_LEN = 16
_PROBE_OUTPUT_LEN = 8


def add_context_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``octavo bench context-sweep``."""
    add_server_arguments(parser)
    parser.add_argument("--step", type=int, default=2000, help="prompt tokens added per step (default: 2000)")
    parser.add_argument("--start", type=int, default=None, help="first prompt length (default: --step)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per step (default: 128)")
    parser.add_argument("--max-steps", type=int, default=100,
                        help="give up after this many steps without a refusal (default: 100)")
    parser.add_argument("--output", "-o", default=None, help="write every step to this JSON file")
    parser.add_argument("--plot", default=None,
                        help="PNG of time and speed against prompt length (default: the --output path with "
                             ".png, else context-sweep.png)")


def _prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    spec = WorkloadSpec("context-sweep", 1, (length, length), (1, 1))
    return build_requests(spec, vocab_size, seed)[0].prompt_token_ids


async def _measure(session, target: Target, label: str, prompt_len: int, output_len: int, vocab_size: int,
                   seed: int) -> dict[str, Any]:
    """Send one streaming request and describe it as a row of the sweep."""
    result = await send_request(session, "completions", target.model, _prompt(prompt_len, vocab_size, seed),
                                prompt_len, output_len)
    prompt_tokens = result.prompt_tokens if result.prompt_tokens is not None else prompt_len
    decode_s = result.e2e - result.ttft if result.ttft is not None else None
    generated = result.output_tokens if result.success else 0
    return {
        "label": label, "kind": "step" if label.isdigit() else label, "prompt_tokens": prompt_tokens,
        "generated_tokens": generated, "total_tokens": prompt_tokens + generated, "max_tokens": output_len,
        "seconds": result.e2e, "ttft_s": result.ttft,
        "output_tok_s": result.output_tokens / result.e2e if result.success and result.e2e > 0 else None,
        "decode_tok_s": (result.output_tokens - 1) / decode_s if result.success and decode_s else None,
        "ok": result.success and result.output_tokens == output_len, "status": result.status, "error": result.error,
    }


def _format_row(row: dict[str, Any]) -> str:
    if row["error"]:
        return f"{row['label']:>6}  {row['prompt_tokens']:>9,}  refused: {row['error']}"
    ttft = "-" if row["ttft_s"] is None else f"{row['ttft_s']:.3f}"
    speed = "-" if row["output_tok_s"] is None else f"{row['output_tok_s']:,.1f}"
    wrong = "" if row["ok"] else f"  (asked for {row['max_tokens']})"
    return (f"{row['label']:>6}  {row['prompt_tokens']:>9,}  {row['generated_tokens']:>9,}  {row['total_tokens']:>9,}"
            f"  {row['seconds']:>8.3f}  {ttft:>8}  {speed:>9}{wrong}")


_HEADER = f"{'step':>6}  {'prompt':>9}  {'generated':>9}  {'total':>9}  {'seconds':>8}  {'TTFT s':>8}  {'tok/s':>9}"


async def _health(session) -> Optional[int]:
    try:
        async with session.get("health") as response:
            return response.status
    except Exception:  # noqa: BLE001 - reported as no answer
        return None


async def run_sweep(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Grow the prompt until a refusal, probe the edge, check the server still serves; print as it goes."""
    start = args.start or args.step
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> dict[str, Any]:
        rows.append(row)
        print(_format_row(row), flush=True)
        return row

    print(_HEADER, flush=True)
    async with open_session(target) as session:
        refused = None
        for index in range(args.max_steps):
            row = record(await _measure(session, target, str(index + 1), start + index * args.step, args.output_len,
                                        args.vocab_size, args.seed + index))
            if row["error"]:
                refused = row
                break
        edge_ok = None
        if refused is not None and refused["status"] == 400 and target.max_model_len:
            fits = target.max_model_len - args.output_len
            seed = args.seed + args.max_steps
            checks = []
            if fits >= 1:
                checks.append(record(await _measure(session, target, "fits", fits, args.output_len, args.vocab_size,
                                                    seed))["ok"])
            over = record(await _measure(session, target, "over", fits + 1, args.output_len, args.vocab_size,
                                         seed + 1))
            edge_ok = all(checks) and over["status"] == 400
        after = record(await _measure(session, target, "after", _PROBE_PROMPT_LEN, _PROBE_OUTPUT_LEN,
                                      args.vocab_size, args.seed + args.max_steps + 2))
        health = await _health(session)
    served = [row for row in rows if row["kind"] == "step" and not row["error"]]
    return {
        "target": {"base_url": target.base_url, "model": target.model, "max_model_len": target.max_model_len},
        "settings": {"start": start, "step": args.step, "output_len": args.output_len, "max_steps": args.max_steps,
                     "vocab_size": args.vocab_size, "seed": args.seed},
        "rows": rows,
        "longest_served_prompt": max((row["prompt_tokens"] for row in served), default=None),
        "refused_at": None if refused is None else refused["prompt_tokens"],
        "refusal": None if refused is None else {"status": refused["status"], "error": refused["error"]},
        "limit_at_max_model_len": edge_ok,
        "alive_after": after["ok"] and health in (200, 404),  # 404: a server with no /health
        "health_status": health,
        "all_steps_ok": all(row["ok"] for row in served),
    }


def verdict(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """(passed, lines saying why) for a sweep report."""
    lines, passed = [], True
    refusal = report["refusal"]
    if refusal is None:
        passed = False
        lines.append(f"no refusal within {report['settings']['max_steps']} steps: raise --max-steps or --step.")
    elif refusal["status"] != 400:
        passed = False
        lines.append(f"FAILED: the server answered {refusal['error']} instead of a 400.")
    else:
        lines.append(f"400 at {report['refused_at']:,} prompt tokens + {report['settings']['output_len']} "
                     f"(longest served prompt {report['longest_served_prompt'] or 0:,}): {refusal['error']}")
    if report["limit_at_max_model_len"] is False:
        passed = False
        lines.append(f"FAILED: the limit is not at max_model_len {report['target']['max_model_len']:,} "
                     "(rows 'fits' and 'over').")
    elif report["limit_at_max_model_len"]:
        lines.append(f"the limit is exactly max_model_len {report['target']['max_model_len']:,}.")
    if not report["all_steps_ok"]:
        passed = False
        lines.append("FAILED: a served step got another number of tokens than asked for.")
    if report["alive_after"]:
        lines.append(f"the server still serves after the refusal (/health {report['health_status']}).")
    else:
        passed = False
        lines.append(f"FAILED: the server does not serve after the refusal (/health {report['health_status']}).")
    return passed, lines


def plot_context_sweep(report: dict[str, Any], path: Path) -> None:
    """Seconds and TTFT (left axis) and output tokens/s (right axis) against prompt length."""
    served = [row for row in report["rows"] if row["kind"] == "step" and not row["error"]]
    figure = import_pyplot_figure()(figsize=(9, 5.5), layout="constrained")
    axes = figure.add_subplot()
    lengths = [row["prompt_tokens"] for row in served]
    axes.plot(lengths, [row["seconds"] for row in served], "o-", label="seconds per request")
    axes.plot(lengths, [row["ttft_s"] for row in served], "s--", label="time to first token (s)")
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("seconds")
    speed = axes.twinx()
    speed.plot(lengths, [row["output_tok_s"] for row in served], "^:", color="tab:green", label="output tok/s")
    speed.set_ylabel("output tokens/s")
    axes.set_ylim(bottom=0)
    speed.set_ylim(bottom=0)
    if report["refused_at"] is not None:
        axes.axvline(report["refused_at"], color="tab:red", alpha=0.6,
                     label=f"refused ({report['refusal']['status']}) at {report['refused_at']:,}")
    handles, labels = axes.get_legend_handles_labels()
    more_handles, more_labels = speed.get_legend_handles_labels()
    axes.legend(handles + more_handles, labels + more_labels, loc="upper left")
    axes.grid(alpha=0.3)
    target = report["target"]
    limit = f", max_model_len {target['max_model_len']:,}" if target["max_model_len"] else ""
    axes.set_title(f"context sweep: {target['model']}{limit}, {report['settings']['output_len']} tokens generated "
                   "per step")
    figure.savefig(path, dpi=110)


def run_context_sweep(args: argparse.Namespace) -> int:
    """Entry point of ``octavo bench context-sweep``; 0 only if the limit was found and the server survived it."""
    for name in ("step", "output_len", "max_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.start is not None and args.start < 1:
        raise ValueError(f"--start must be >= 1, got {args.start}.")
    target = run_async(resolve_target(args))
    print(f"{target.base_url} model {target.model}, max_model_len {target.max_model_len or 'not stated'}: prompt "
          f"grows by {args.step:,} tokens, {args.output_len} generated per step", file=sys.stderr)
    report = run_async(run_sweep(target, args))
    passed, lines = verdict(report)
    report["passed"] = passed
    print("\n".join(lines))
    plot = Path(args.plot or (Path(args.output).with_suffix(".png") if args.output else "context-sweep.png"))
    plot_context_sweep(report, plot)
    report["plot"] = str(plot)
    print(f"wrote {plot}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0 if passed else 1
