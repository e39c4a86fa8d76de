"""What ``octavo bench serve``'s client costs: it streams from a stub server with known timings.

    python -m octavo.benchmarks.client_overhead --concurrency 512 --output-len 256 --interval-ms 10

The stub (its own process, so its CPU is not counted) answers /v1/completions and
/v1/chat/completions with one chunk per token every ``--interval-ms``, then the usage chunk
(only when asked for, as a real server does). The client's CPU time per chunk says how many
chunks per second one core can take, hence whether it keeps up with a server's token rate; the
measured ITL and TTFT beside the stub's fixed interval bound what the client's queueing adds to
what it reports (from above: the stub is Python too, and its writes to hundreds of sockets
stretch its own interval).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from octavo.benchmarks.serve import Target, format_run, run_async, run_load, summarize
from octavo.benchmarks.workloads import WorkloadSpec, build_requests

STUB_MODEL = "stub"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(data: Any) -> bytes:
    return _http_chunk(b"data: " + json.dumps(data).encode() + b"\n\n")


def _json_response(status: str, body: Any) -> bytes:
    payload = json.dumps(body).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            .encode() + payload)


@dataclass
class _Stream:
    writer: asyncio.StreamWriter
    token: bytes  # one token's chunk
    last: bytes  # the finishing token's chunk, the usage chunk when asked for, [DONE], end of body
    remaining: int
    done: asyncio.Future


class _Ticker:
    """Writes one token to every open stream each interval. One timer for all streams, not one per
    stream, keeps the stub's interval at hundreds of streams; a new stream gets its first token one
    full interval after it joins."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.active: list[_Stream] = []
        self.joining: list[_Stream] = []

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            still_open = []
            for stream in self.active:
                stream.remaining -= 1
                if stream.remaining:
                    stream.writer.write(stream.token)
                    still_open.append(stream)
                else:
                    stream.writer.write(stream.last)
                    stream.done.set_result(None)
            self.active, self.joining = still_open + self.joining, []


async def _stream(ticker: _Ticker, writer: asyncio.StreamWriter, path: str, body: dict, usage: bool) -> None:
    chat = path.endswith("/chat/completions")
    max_tokens = max(1, int(body.get("max_tokens") or 16))

    def choice(finish: Optional[str]) -> dict:
        if chat:
            return {"index": 0, "delta": {"content": " tok"}, "finish_reason": finish}
        return {"index": 0, "text": " tok", "logprobs": None, "finish_reason": finish}

    chunk = {"id": "stub", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
             "model": STUB_MODEL}
    last = _event({**chunk, "choices": [choice("length")]})
    if usage and (body.get("stream_options") or {}).get("include_usage"):
        prompt = body["messages"][0]["content"].split() if chat else body.get("prompt")
        last += _event({**chunk, "choices": [], "usage": {
            "prompt_tokens": len(prompt), "completion_tokens": max_tokens, "total_tokens": len(prompt) + max_tokens}})
    last += _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    writer.write(_HEAD)
    if chat:
        writer.write(_event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    stream = _Stream(writer, _event({**chunk, "choices": [choice(None)]}), last, max_tokens,
                     asyncio.get_running_loop().create_future())
    ticker.joining.append(stream)
    await stream.done
    await writer.drain()


async def serve_stub(port: int, interval_s: float, usage: bool) -> None:
    """A keep-alive HTTP/1.1 server that streams like an OpenAI server with a fixed inter-token time."""
    ticker = _Ticker(interval_s)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = dict(line.lower().split(": ", 1) for line in header_lines if ": " in line)
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "GET" and path == "/v1/models":
                    writer.write(_json_response("200 OK", {"object": "list", "data": [{"id": STUB_MODEL}]}))
                elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                    await _stream(ticker, writer, path, json.loads(body), usage)
                else:
                    writer.write(_json_response("404 Not Found", {"error": {"message": f"no route {path}"}}))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    ticking = asyncio.ensure_future(ticker.run())
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        try:
            await server.serve_forever()
        finally:
            ticking.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stub(interval_s: float, usage: bool = True, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start the stub in its own process; returns it and its base URL once it accepts connections."""
    port = free_port()
    command = [sys.executable, "-m", "octavo.benchmarks.client_overhead", "--stub-port", str(port),
               "--interval-ms", str(interval_s * 1e3)] + ([] if usage else ["--no-usage"])
    process = subprocess.Popen(command)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the stub server did not start") from None
            time.sleep(0.05)


def measure(concurrency: int, output_len: int, interval_s: float, endpoint: str = "completions",
            usage: bool = True) -> dict[str, Any]:
    """Stream ``concurrency`` requests at once from the stub; the run's summary plus the overhead figures."""
    process, url = start_stub(interval_s, usage)
    try:
        spec = WorkloadSpec("stub", concurrency, (16, 16), (output_len, output_len))
        requests = build_requests(spec, vocab_size=1000)
        prompts = [r.prompt_token_ids if endpoint == "completions" else " ".join(map(str, r.prompt_token_ids))
                   for r in requests]
        run = run_async(run_load(Target(url, STUB_MODEL), endpoint, prompts, requests, float("inf"), None, 0))
    finally:
        process.terminate()
        process.wait(timeout=30)
    summary = summarize(run)
    client = summary["client"]
    interval_ms = interval_s * 1e3
    summary["overhead"] = {
        "stub_interval_ms": interval_ms,
        "chunks_per_s": client["chunks"] / summary["duration_s"],
        "chunks_per_core_s": 1e6 / client["cpu_us_per_chunk"] if client["cpu_us_per_chunk"] else None,
        "itl_excess_mean_ms": summary["itl_ms"]["mean"] - interval_ms if summary["itl_ms"] else None,
        "ttft_excess_median_ms": summary["ttft_ms"]["median"] - interval_ms if summary["ttft_ms"] else None,
    }
    return summary


def format_overhead(summary: dict[str, Any]) -> str:
    o, client = summary["overhead"], summary["client"]
    return "\n".join([
        format_run(summary),
        f"client overhead at {summary['num_requests']} streams: {client['cpu_us_per_chunk']:.1f} us CPU per chunk "
        f"(one core takes {o['chunks_per_core_s']:,.0f} chunks/s); delivered {o['chunks_per_s']:,.0f} chunks/s; "
        f"over the stub's {o['stub_interval_ms']:g} ms interval: mean ITL +{o['itl_excess_mean_ms']:.2f} ms, median "
        f"TTFT +{o['ttft_excess_median_ms']:.2f} ms (the stub's own writing and the connection set-up included)",
    ])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=512, help="streams at once (default: 512)")
    parser.add_argument("--output-len", type=int, default=256, help="chunks per stream (default: 256)")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="stub's time between chunks (default: 10)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--output", "-o", default=None, help="write the figures to this JSON file")
    parser.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)  # run as the stub
    parser.add_argument("--no-usage", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stub_port is not None:
        run_async(serve_stub(args.stub_port, args.interval_ms / 1e3, not args.no_usage))
        return 0
    summary = measure(args.concurrency, args.output_len, args.interval_ms / 1e3, args.endpoint)
    print(format_overhead(summary))
    if args.output:
        summary.pop("requests")
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
