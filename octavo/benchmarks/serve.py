"""``octavo bench serve``: latency and throughput of any OpenAI-compatible server, over HTTP.

    octavo bench serve --base-url http://127.0.0.1:8000 --workload fixed --request-rate 16
    octavo bench serve --sweep-rates inf,4,8,16,32 --output serve.json   # and serve.png

Requests are the standard workloads (``workloads.build_requests``), sent as token ids or as
text, greedy with ``ignore_eos`` so each produces exactly its output length; arrivals are
Poisson at ``--request-rate`` (all at once for ``inf``). Every request streams, and the client
times each chunk that carries text: TTFT is the first, ITL the gaps between them, TPOT the time
after the first token spread over the remaining tokens. Token counts come from the server's
usage (``stream_options.include_usage``), or from the chunks where it sends none.

The client is aiohttp with a minimal SSE reader (measured against a stub server at 512 streams:
several times less CPU per chunk than httpx or the ``openai`` client; see ``client_overhead``),
on uvloop when it is installed. Each run reports the client's own CPU time so that a client
that became the bottleneck shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Optional, TypeVar, Union

import numpy as np

from octavo.benchmarks.workloads import WORKLOADS, Request, build_requests, warmup_requests

T = TypeVar("T")
Prompt = Union[str, list[int]]

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Ids are drawn below min(vocab_size, 32000): this default gives every model of at least 32,000 tokens
# the same prompts, and the ones `octavo bench throughput` gives such a model.
DEFAULT_VOCAB_SIZE = 32000
# Error messages kept per run: enough to see what went wrong without one line per failed request.
_ERRORS_KEPT = 5
# Above this share of the run spent on the client's CPU, its timings include its own queueing.
_BUSY_CLIENT = 0.8


# ---- the server ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where requests go, and what the server said about itself."""

    base_url: str
    model: str
    api_key: Optional[str] = None
    max_model_len: Optional[int] = None
    timeout_s: float = 600.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that say which server to talk to (shared with ``context-sweep``)."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server, without /v1 (default: http://127.0.0.1:8000)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY or $OCTAVO_API_KEY)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="prompt ids are drawn from [10, min(vocab size, 32000)) (default: 32000; "
                             "give it for a model with a smaller vocabulary)")
    parser.add_argument("--seed", type=int, default=0, help="prompt and arrival seed (default: 0)")


def _import_aiohttp():
    try:
        import aiohttp
    except ImportError:
        raise ValueError("the serving benchmarks need aiohttp: pip install aiohttp "
                         "(or pip install 'octavo[bench]').") from None
    return aiohttp


def open_session(target: Target, connections: int = 0):
    """An aiohttp session for ``target``; ``connections`` 0 means no limit."""
    aiohttp = _import_aiohttp()
    return aiohttp.ClientSession(
        base_url=target.base_url.rstrip("/") + "/", headers=target.headers,
        connector=aiohttp.TCPConnector(limit=connections), read_bufsize=1 << 20,
        timeout=aiohttp.ClientTimeout(total=target.timeout_s))


async def resolve_target(args: argparse.Namespace) -> Target:
    """The target of ``args``, with the model name and max_model_len from /v1/models when it has them."""
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("OCTAVO_API_KEY")
    target = Target(args.base_url, args.model or "", api_key, None, args.request_timeout)
    async with open_session(target) as session:
        try:
            async with session.get("v1/models") as response:
                if response.status == 200:
                    cards = (await response.json()).get("data") or []
                elif args.model:  # a server without /v1/models can still be benchmarked
                    cards = []
                else:
                    raise ValueError(f"{args.base_url}/v1/models answered "
                                     f"{error_message(response.status, await response.text())}")
        except _import_aiohttp().ClientError as error:
            raise ValueError(f"cannot reach {args.base_url}/v1/models ({type(error).__name__}: {error}); "
                             "is the server running? Check --base-url.") from None
    card = next((c for c in cards if not args.model or c.get("id") == args.model), None)
    if card is None and not args.model:
        raise ValueError(f"{args.base_url}/v1/models lists no model; give --model.")
    model = args.model or card["id"]
    return Target(args.base_url, model, api_key, (card or {}).get("max_model_len"), args.request_timeout)


def error_message(status: int, body: str) -> str:
    """``HTTP <status>: <message>``, the message taken from an OpenAI (or older vLLM) error body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    message = body.strip()[:300]
    if isinstance(data, dict):
        inner = data.get("error")
        message = (inner.get("message") if isinstance(inner, dict) else inner) or data.get("message") or message
    return f"HTTP {status}: {message}"


# ---- one request ---------------------------------------------------------------------------
@dataclass
class RequestResult:
    """One request's timings (seconds from its send) and token counts."""

    prompt_len: int  # tokens as built (text prompts may tokenize to another count)
    expected_output_len: int
    success: bool = False
    error: Optional[str] = None
    status: Optional[int] = None
    ttft: Optional[float] = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # chunks that carried text
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None  # from the server's usage
    tokens_from_usage: bool = False
    streamed_text: bool = False
    sent_at: float = 0.0  # seconds after the run started

    @property
    def tpot(self) -> Optional[float]:
        """Seconds per output token after the first; None for a single token."""
        if not self.success or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def request_body(endpoint: str, model: str, prompt: Prompt, output_len: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def event_data(line: bytes) -> Optional[bytes]:
    """The payload of an SSE ``data:`` line; None for comments, other fields and blank lines."""
    return line[5:].strip() if line.startswith(b"data:") else None


def chunk_text(chunk: dict, endpoint: str) -> tuple[str, bool]:
    """(text of the first choice, whether that choice finished) in a completions or chat chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return "", False
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or ""
    else:
        text = choice.get("text") or ""
    return text, choice.get("finish_reason") is not None


async def send_request(session, endpoint: str, model: str, prompt: Prompt, prompt_len: int,
                       output_len: int) -> RequestResult:
    """Stream one request and time its chunks; every failure is recorded, never raised."""
    aiohttp = _import_aiohttp()
    result = RequestResult(prompt_len, output_len)
    started = time.perf_counter()
    last = finished_at = None
    done = False
    try:
        async with session.post(ENDPOINTS[endpoint].lstrip("/"),
                                json=request_body(endpoint, model, prompt, output_len)) as response:
            result.status = response.status
            if response.status != 200:
                result.error = error_message(response.status, await response.text())
                return result
            async for line in response.content:
                data = event_data(line)
                if not data:
                    continue
                if data == b"[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = "in-stream error: " + str((chunk["error"] or {}).get("message", chunk["error"]))
                    return result
                text, finished = chunk_text(chunk, endpoint)
                if text:
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.chunks += 1
                elif finished and finished_at is None:
                    finished_at = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.tokens_from_usage = True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return result
    finally:
        result.e2e = time.perf_counter() - started
    if not done:
        result.error = "the stream ended without data: [DONE]"
        return result
    result.streamed_text = result.ttft is not None
    if result.ttft is None and finished_at is not None:
        # A server without a tokenizer streams no text: the finishing chunk is its first output.
        result.ttft = finished_at - started
    if not result.tokens_from_usage:
        result.output_tokens = result.chunks
    result.success = True
    return result


# ---- a load run ----------------------------------------------------------------------------
def parse_rate(text: str) -> float:
    """A request rate in requests per second: a positive number or ``inf``."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a request rate: {text!r} (give requests per second, or inf).") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"the request rate must be > 0 (or inf), got {text!r}.")
    return rate


def parse_rates(text: str) -> list[float]:
    return [parse_rate(part.strip()) for part in text.split(",") if part.strip()]


def arrival_times(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: Poisson arrivals at ``rate``, all at 0 for ``inf``."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(f"arrivals {seed}")
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(rate)
    return times


@dataclass
class LoadRun:
    request_rate: float
    max_concurrency: Optional[int]
    seed: int
    results: list[RequestResult]
    duration_s: float
    client_cpu_s: float


async def run_load(target: Target, endpoint: str, prompts: list[Prompt], requests: list[Request], rate: float,
                   max_concurrency: Optional[int], seed: int, warmup: tuple[list[Prompt], list[Request]] = ([], [])
                   ) -> LoadRun:
    """Warm up (untimed, all at once), then send ``prompts`` at their arrival times and wait for all."""
    async with open_session(target, max_concurrency or 0) as session:
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

        async def send(prompt: Prompt, request: Request) -> RequestResult:
            async with gate:
                return await send_request(session, endpoint, target.model, prompt, request.prompt_len,
                                          request.output_len)

        await asyncio.gather(*(send(p, r) for p, r in zip(*warmup)))
        arrivals = arrival_times(len(prompts), rate, seed)
        cpu_started = time.process_time()
        started = time.perf_counter()
        tasks = []
        for when, prompt, request in zip(arrivals, prompts, requests):
            delay = started + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(prompt, request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
    for result, when in zip(results, arrivals):
        result.sent_at = when
    return LoadRun(rate, max_concurrency, seed, list(results), duration, client_cpu)


def run_async(work: Awaitable[T]) -> T:
    """Run ``work`` on uvloop when it is installed (less client CPU per chunk), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


# ---- metrics -------------------------------------------------------------------------------
def latency_stats(seconds: list[float]) -> Optional[dict[str, float]]:
    """Mean, median and p99 in milliseconds; None when there is nothing to summarize."""
    if not seconds:
        return None
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p99": float(np.percentile(values, 99))}


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def summarize(run: LoadRun) -> dict[str, Any]:
    """Every figure of one run, JSON-ready. Throughputs count only the requests that succeeded."""
    ok = [r for r in run.results if r.success]
    failed = [r for r in run.results if not r.success]
    errors = list(dict.fromkeys(r.error for r in failed))[:_ERRORS_KEPT]
    wrong = [r for r in ok if r.output_tokens != r.expected_output_len]
    prompt_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = run.duration_s
    chunks = sum(r.chunks for r in run.results)
    sources = {r.tokens_from_usage for r in ok}
    return {
        "request_rate": rate_label(run.request_rate), "max_concurrency": run.max_concurrency, "seed": run.seed,
        "num_requests": len(run.results), "completed": len(ok), "failed": len(failed), "errors": errors,
        "duration_s": duration, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_output_len for r in ok),
        "wrong_output_len": len(wrong),
        "wrong_output_len_examples": [(r.output_tokens, r.expected_output_len) for r in wrong[:_ERRORS_KEPT]],
        "token_counts_from": "usage" if sources == {True} else "chunks" if sources == {False} else "mixed",
        "no_text_streams": sum(1 for r in ok if not r.streamed_text),
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_throughput": (prompt_tokens + output_tokens) / duration,
        "ttft_ms": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": latency_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": latency_stats([gap for r in ok for gap in r.itl]),
        "e2el_ms": latency_stats([r.e2e for r in ok]),
        "client": {"cpu_s": run.client_cpu_s, "chunks": chunks,
                   "cpu_us_per_chunk": run.client_cpu_s / chunks * 1e6 if chunks else None,
                   "busy_fraction": run.client_cpu_s / duration},
        "requests": [{"prompt_len": r.prompt_len, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                      "expected_output_tokens": r.expected_output_len, "sent_at_s": r.sent_at, "ttft_s": r.ttft,
                      "e2el_s": r.e2e, "tpot_s": r.tpot, "chunks": r.chunks, "error": r.error}
                     for r in run.results],
    }


def _ms(stats: Optional[dict[str, float]], key: str) -> str:
    return "-" if stats is None else f"{stats[key]:,.1f}"


def format_run(summary: dict[str, Any]) -> str:
    """One run: counts, throughputs, the latency table, then anything that needs a second look."""
    lines = [
        f"rate {summary['request_rate']} req/s | {summary['num_requests']} requests: {summary['completed']} ok, "
        f"{summary['failed']} failed | {summary['duration_s']:.2f} s",
        f"request throughput {summary['request_throughput']:.2f} req/s | output {summary['output_throughput']:,.0f} "
        f"tok/s | total {summary['total_throughput']:,.0f} tok/s | {summary['output_tokens']:,} output tokens "
        f"(counted from {summary['token_counts_from']})",
        f"{'':10}{'mean':>12}{'median':>12}{'p99':>12}",
    ]
    for label, key in (("TTFT ms", "ttft_ms"), ("TPOT ms", "tpot_ms"), ("ITL ms", "itl_ms"), ("E2E ms", "e2el_ms")):
        stats = summary[key]
        lines.append(f"{label:10}{_ms(stats, 'mean'):>12}{_ms(stats, 'median'):>12}{_ms(stats, 'p99'):>12}")
    client = summary["client"]
    per_chunk = "" if client["cpu_us_per_chunk"] is None else f" ({client['cpu_us_per_chunk']:.0f} us each)"
    lines.append(f"client: {client['cpu_s']:.2f} s CPU for {client['chunks']:,} chunks{per_chunk}, busy "
                 f"{client['busy_fraction']:.0%} of the run")
    if client["busy_fraction"] > _BUSY_CLIENT:
        lines.append("WARNING: the client was busy most of the run: its timings include its own queueing.")
    if summary["wrong_output_len"]:
        lines.append(f"WARNING: {summary['wrong_output_len']} request(s) got another number of tokens than asked "
                     f"(got, asked): {summary['wrong_output_len_examples']}; does the server honour ignore_eos?")
    if summary["no_text_streams"]:
        lines.append(f"WARNING: {summary['no_text_streams']} stream(s) carried no text (a server without a "
                     "tokenizer?): their TTFT is the finishing chunk's time and they have no ITL.")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def format_sweep(summaries: list[dict[str, Any]]) -> str:
    """One row per rate."""
    header = ["rate", "ok", "failed", "req/s", "out tok/s", "TTFT med", "TTFT p99", "TPOT med", "TPOT p99",
              "ITL med", "ITL p99", "E2E med", "E2E p99"]
    rows = [header]
    for s in summaries:
        rows.append([s["request_rate"], str(s["completed"]), str(s["failed"]), f"{s['request_throughput']:.2f}",
                     f"{s['output_throughput']:,.0f}",
                     *[_ms(s[key], stat) for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
                       for stat in ("median", "p99")]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(["latencies in ms", *lines])


def import_pyplot_figure():
    """matplotlib's ``Figure`` (no pyplot, so no display is needed), or a clear error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("drawing the plot needs matplotlib: pip install matplotlib "
                         "(or pip install 'octavo[bench]').") from None
    return Figure


def plot_sweep(summaries: list[dict[str, Any]], path: Path, title: str) -> None:
    """Median and p99 of TTFT, TPOT, ITL and end-to-end latency against the request rate."""
    figure = import_pyplot_figure()(figsize=(11, 7.5), layout="constrained")
    summaries = sorted(summaries, key=lambda s: float(s["request_rate"]))  # "inf" parses, and sorts last
    labels = [s["request_rate"] for s in summaries]
    positions = list(range(len(labels)))  # rates as evenly spaced categories: 1, 2, 4, ... and inf
    panels = [("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("end-to-end latency", "e2el_ms")]
    for index, (name, key) in enumerate(panels):
        axes = figure.add_subplot(2, 2, index + 1)
        for stat, style in (("median", "o-"), ("p99", "s--")):
            values = [s[key][stat] if s[key] else float("nan") for s in summaries]
            axes.plot(positions, values, style, label=stat)
        axes.set_xticks(positions, labels)
        axes.set_xlabel("request rate (req/s)")
        axes.set_ylabel(f"{name} (ms)")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=110)


# ---- prompts -------------------------------------------------------------------------------
async def _detokenize_on_server(target: Target, prompts: list[list[int]]) -> list[str]:
    async with open_session(target) as session:
        async def one(ids: list[int]) -> str:
            async with session.post("detokenize", json={"model": target.model, "tokens": ids}) as response:
                if response.status != 200:
                    failure = error_message(response.status, await response.text())
                    raise ValueError(f"the server's /detokenize failed ({failure}); give --tokenizer to turn the "
                                     "prompts into text here.")
                return (await response.json())["prompt"]

        return list(await asyncio.gather(*(one(ids) for ids in prompts)))


def render_prompts(requests: list[Request], prompt_format: str, target: Target,
                   tokenizer_path: Optional[str]) -> list[Prompt]:
    """Token ids as built, or their text: decoded here with ``tokenizer_path`` or by the server."""
    ids = [r.prompt_token_ids for r in requests]
    if prompt_format == "ids" or not ids:
        return ids
    if tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        return [tokenizer.decode(prompt) for prompt in ids]
    return run_async(_detokenize_on_server(target, ids))


# ---- the command ---------------------------------------------------------------------------
def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``octavo bench serve``."""
    add_server_arguments(parser)
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions",
                        help="/v1/completions or /v1/chat/completions (default: completions)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed", help="(default: fixed)")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests (default: the workload's)")
    parser.add_argument("--prompt-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="prompt lengths in tokens (default: the workload's, 100 1024)")
    parser.add_argument("--output-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="output lengths in tokens (default: the workload's)")
    parser.add_argument("--prompt-format", choices=["ids", "text"], default=None,
                        help="send token ids, or their text (default: ids for completions, text for chat)")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer folder that turns text prompts' ids into text (default: the server's "
                             "/detokenize)")
    parser.add_argument("--request-rate", type=parse_rate, default=float("inf"),
                        help="requests per second, Poisson arrivals; inf sends all at once (default: inf)")
    parser.add_argument("--sweep-rates", type=parse_rates, default=None,
                        help="comma-separated rates, e.g. inf,1,2,4: one run each (with its own prompts, seed "
                             "+ index, so no run hits another's prefix cache), and a PNG of latency against rate")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    parser.add_argument("--num-warmups", type=int, default=4,
                        help="short untimed requests before each run (default: 4)")
    parser.add_argument("--output", "-o", default=None, help="write every figure to this JSON file")
    parser.add_argument("--plot", default=None,
                        help="PNG of a sweep (default: the --output path with .png, else serve-sweep.png)")


def _check_args(args: argparse.Namespace) -> None:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}.")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}.")
    if args.endpoint == "chat" and args.prompt_format == "ids":
        raise ValueError("chat messages are text: use --prompt-format text with --endpoint chat.")
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}.")


def run_serve_bench(args: argparse.Namespace) -> int:
    """Entry point of ``octavo bench serve``; exit status 1 when a request failed or got the wrong length."""
    _check_args(args)
    spec = WORKLOADS[args.workload].with_overrides(args.num_prompts, args.prompt_len_range, args.output_len_range)
    prompt_format = args.prompt_format or ("text" if args.endpoint == "chat" else "ids")
    rates = args.sweep_rates or [args.request_rate]
    target = run_async(resolve_target(args))
    aiohttp = _import_aiohttp()
    report: dict[str, Any] = {
        "meta": {"base_url": target.base_url, "model": target.model, "endpoint": ENDPOINTS[args.endpoint],
                 "max_model_len": target.max_model_len, "prompt_format": prompt_format, "tokenizer": args.tokenizer,
                 "client": f"aiohttp {aiohttp.__version__}", "python": platform.python_version()},
        "workload": {"name": spec.name, "num_prompts": spec.num_prompts, "prompt_len": list(spec.prompt_len),
                     "output_len": list(spec.output_len), "vocab_size": args.vocab_size, "seed": args.seed,
                     "num_warmups": args.num_warmups},
        "runs": [],
    }
    print(f"{target.base_url}{ENDPOINTS[args.endpoint]} model {target.model} | workload {spec.name}: "
          f"{spec.num_prompts} requests, prompt {spec.prompt_len[0]}..{spec.prompt_len[1]}, output "
          f"{spec.output_len[0]}..{spec.output_len[1]} tokens, as {prompt_format}", file=sys.stderr)
    bad = False
    for index, rate in enumerate(rates):
        seed = args.seed + index
        requests = build_requests(spec, args.vocab_size, seed)
        warmup = warmup_requests(requests, args.vocab_size, seed, count=args.num_warmups)
        prompts = render_prompts(requests, prompt_format, target, args.tokenizer)
        warmup_prompts = render_prompts(warmup, prompt_format, target, args.tokenizer)
        print(f"rate {rate_label(rate)} req/s: sending {len(requests)} requests...", file=sys.stderr)
        run = run_async(run_load(target, args.endpoint, prompts, requests, rate, args.max_concurrency, seed,
                                 (warmup_prompts, warmup)))
        summary = summarize(run)
        bad |= bool(summary["failed"] or summary["wrong_output_len"])
        report["runs"].append(summary)
        print(format_run(summary))
        print()
    if len(rates) > 1:
        print(format_sweep(report["runs"]))
        plot = Path(args.plot or (Path(args.output).with_suffix(".png") if args.output else "serve-sweep.png"))
        plot_sweep(report["runs"], plot, f"{target.model} via {ENDPOINTS[args.endpoint]}: {spec.name}, "
                                         f"{spec.num_prompts} requests")
        report["plot"] = str(plot)
        print(f"wrote {plot}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 1 if bad else 0

