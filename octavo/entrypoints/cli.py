"""The ``octavo`` command: generate, chat, serve, bench, watermark."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional, Union

from octavo.sampling_params import SamplingParams


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
LOG_LEVELS = ("debug", "info", "warning", "error")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "pt")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already names it or there is
    none to show (a switch that is off, a value that defaults to nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def parse_bytes(text: str) -> int:
    """``1073741824``, ``512MiB``, ``2G``, ``64k``: a size in bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (try 1073741824, 512MiB or 2GiB).")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}.")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}.")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}.")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}.")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}.")
    return value


def device_name(text: str) -> str:
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}.")
    return text


def dtype_name(text: str) -> str:
    import torch

    from octavo.config import resolve_dtype

    try:
        resolve_dtype(text, None, torch.device("cpu"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_log_level_argument(parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup],
                           default: Optional[str]) -> None:
    """One ``--log-level`` for every command, accepted before and after the command name."""
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default,
                        help="what to log (default: warning; info for serve)")


def ignore_tokenizer_length_limit(tokenizer) -> None:
    """octavo enforces the engine's max_model_len; the tokenizer's own limit would only make
    transformers log "Token indices sequence length is longer than ..." for a prompt that is then
    refused anyway."""
    if tokenizer is not None:
        tokenizer.model_max_length = sys.maxsize


def add_engine_arguments(parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup],
                         model_positional: bool = False) -> None:
    """Model and engine flags shared by every subcommand (serve included)."""
    help_model = "HF model folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)"
    if model_positional:
        parser.add_argument("model", nargs="?", default=None, help=help_model)
    else:
        parser.add_argument("--model", "-m", default=None, help=help_model)
    parser.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", type=dtype_name, default="auto",
                        help="auto | float32 | float16 | bfloat16 (default: auto: float32 on CPU, the "
                             "checkpoint's half type on GPU)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=fraction, default=0.9,
                        help="share of GPU memory for weights, activations and KV cache (default: 0.9)")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                        help="KV cache size on CPU, e.g. 512MiB (default: 2GiB)")
    parser.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default: 16)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256,
                        help="most sequences in one step (default: 256)")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                        help="most tokens in one step (default: 8192 on GPU, 512 on CPU)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="wait for each step's tokens before planning the next (default on CUDA: overlap)")
    parser.add_argument("--load-format", choices=_LOAD_FORMATS, default="auto",
                        help="how to read the weights; pt (pickles) also needs --allow-pickle-weights")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="load pickled *.bin/*.pt weights (they can run code: only for trusted sources)")
    parser.add_argument("--gguf-weights", default="auto", choices=("auto", "packed", "float32"),
                        help="GGUF 4-bit matrices on CPU: kept in their blocks (packed; auto does so for float32 "
                             "CPU runs) or decoded to float32, the reference (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="engine seed (default: 0)")
    parser.add_argument("--quantization", default="auto",
                        help="weight format: auto (from config.json), none, awq, compressed-tensors, fp8, gptq; "
                             "fp8 also quantizes a 16-bit checkpoint at load (default: auto)")
    parser.add_argument("--data-parallel-size", type=positive_int, default=1,
                        help="engine replicas behind one front end, each on its own GPU (or sharing the GPUs "
                             "and their memory share when there are fewer; default: 1)")
    parser.add_argument("--distributed-executor-backend", choices=("mp", "ray"), default=None,
                        help="where the engine cores run: mp (local processes, the default) or ray (actors "
                             "placed on the Ray cluster this machine joined)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                        help="split the model across this many GPUs (gloo processes on CPU) (default: 1)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager, load_format=args.load_format,
        allow_pickle_weights=args.allow_pickle_weights, seed=args.seed,
        async_scheduling=False if args.no_async_scheduling else None, quantization=args.quantization,
        gguf_weights=args.gguf_weights,
        data_parallel_size=args.data_parallel_size, distributed_executor_backend=args.distributed_executor_backend,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=positive_int, default=max_tokens, help="most tokens to generate")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=fraction, default=1.0,
                        help="sample from the smallest set of tokens whose probability reaches this (1 = all)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    parser.add_argument("--sampling-seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as ``SamplingParams`` (a ValueError naming the field when one is wrong);
    built before the model loads, so a bad flag costs no loading time."""
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def stream_completion(llm, prompt, params: SamplingParams) -> str:
    """Run one request to completion, printing text as it arrives; Ctrl-C stops it early."""
    engine = llm.llm_engine
    request_id = f"cli-{id(params)}-{engine.num_unfinished_requests}"
    engine.add_request(request_id, prompt, params)
    text, finished = "", False
    try:
        while not finished:
            for output in engine.step():
                if output.request_id == request_id:
                    finished = output.finished
                    delta = output.deltas[0].text
                    text += delta
                    sys.stdout.write(delta)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return text


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> dict:
    """``messages`` rendered with the model's chat template, as an engine prompt."""
    token_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return {"prompt_token_ids": list(token_ids)}


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def cmd_generate(args: argparse.Namespace) -> int:
    from octavo.llm import LLM

    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    tokenizer = llm.get_tokenizer()
    ignore_tokenizer_length_limit(tokenizer)
    # An instruct model answers a prompt sent as a user turn; --raw continues the text as it is.
    as_chat = not args.raw and has_chat_template(tokenizer)
    for prompt in args.prompt:
        if len(args.prompt) > 1:
            print(f"--- {prompt}")
        if as_chat:
            stream_completion(llm, chat_prompt(tokenizer, [{"role": "user", "content": prompt}]), params)
        else:
            sys.stdout.write(prompt)
            stream_completion(llm, prompt, params)
    return 0


CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the history (the --system prompt stays)",
    "/exit": "quit (also /quit or Ctrl-D)",
}


def _chat_help() -> str:
    lines = [f"  {name:<8} {what}" for name, what in CHAT_COMMANDS.items()]
    lines.append("  Ctrl-C stops a reply; start a message with // to send one that begins with /.")
    return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    from octavo.llm import LLM

    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    tokenizer = llm.get_tokenizer()
    if not has_chat_template(tokenizer):
        print("error: this model has no chat template; use `octavo generate`.", file=sys.stderr)
        return 2
    ignore_tokenizer_length_limit(tokenizer)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chatting. /help lists the commands, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("> ").strip()
        except KeyboardInterrupt:  # like a shell: drop the line, ask again
            print()
            continue
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            command = line.split(maxsplit=1)[0]
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history = history[:1] if args.system else []
                print("(history cleared)")
            elif command == "/help":
                print(_chat_help())
            else:
                print(f"unknown command {command}; /help lists the commands.")
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = stream_completion(llm, chat_prompt(tokenizer, history), params)
        except ValueError as error:  # e.g. the history outgrew the context
            history.pop()
            print(f"error: {error} Use /reset to start over.")
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_watermark_detect(args: argparse.Namespace) -> int:
    """Print the z-score of a text (or of token ids) under the green-list watermark."""
    from octavo.watermark import detect_watermark

    if args.token_ids is not None:
        token_ids = [int(t) for t in args.token_ids.replace(",", " ").split()]
    else:
        from pathlib import Path

        from octavo.model_loader import loader

        text = Path(args.file).read_text() if args.file else args.text
        if text is None:
            raise ValueError("give the text to score, --file PATH or --token-ids.")
        model = args.model
        if model is None:
            from octavo.model_loader.default_model import default_model_path

            model = str(default_model_path())
        tokenizer = loader.load_tokenizer(loader.check_model_path(model, "auto"), args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{model} has no tokenizer: pass --tokenizer or --token-ids.")
        token_ids = tokenizer.encode(text, add_special_tokens=False)
    result = detect_watermark(token_ids, args.gamma, args.key, not args.count_repeated_bigrams)
    verdict = "watermarked" if result.is_watermarked(args.z_threshold) else "not watermarked"
    print(f"z-score {result.z_score:.2f}  p-value {result.p_value:.3g}  green {result.num_green_tokens}/"
          f"{result.num_tokens_scored} ({result.green_fraction:.1%})  -> {verdict} (threshold z > {args.z_threshold:g})")
    return 0


def _add_watermark_parser(sub) -> None:
    from octavo.watermark import DEFAULT_GAMMA, DEFAULT_KEY

    watermark = sub.add_parser("watermark", help="detect the green-list watermark in a text",
                               description="Tools for the green-list watermark (SamplingParams(watermark=True)).",
                               formatter_class=HelpFormatter)
    commands = watermark.add_subparsers(dest="watermark_command", required=True, metavar="{detect}")
    detect = commands.add_parser("detect", help="the z-score of a text: above about 4 it was watermarked",
                                 description="Score a text against the green-list watermark: its green tokens "
                                             "against the gamma fraction expected without one.",
                                 formatter_class=HelpFormatter)
    add_log_level_argument(detect, default=argparse.SUPPRESS)
    detect.add_argument("text", nargs="?", default=None, help="the generated text (or --file / --token-ids)")
    detect.add_argument("--file", default=None, help="read the text from this file")
    detect.add_argument("--token-ids", default=None, help="score these token ids instead (comma or space separated)")
    detect.add_argument("--model", default=None, help="the model whose tokenizer produced the text "
                                                      "(default: the embedded SmolLM2-135M-Instruct)")
    detect.add_argument("--tokenizer", default=None, help="a tokenizer folder, if not the model's")
    detect.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="green fraction used when generating")
    detect.add_argument("--key", type=int, default=DEFAULT_KEY, help="watermark_key used when generating")
    detect.add_argument("--z-threshold", type=float, default=4.0)
    detect.add_argument("--count-repeated-bigrams", action="store_true",
                        help="score every token, not each distinct (previous, token) pair once")
    detect.set_defaults(func=cmd_watermark_detect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octavo", description="High-throughput LLM inference and serving.",
                                     formatter_class=HelpFormatter)
    add_log_level_argument(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench,watermark}")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    generate = command("generate", help="answer or complete prompts, streaming the text",
                       description="Stream the model's answer to each prompt: sent as a user turn through "
                                   "the chat template when the model has one, else (or with --raw) continued "
                                   "as plain text.")
    generate.add_argument("prompt", nargs="+", help="prompt text (several prompts run one after another)")
    generate.add_argument("--raw", action="store_true",
                          help="continue the prompt text as it is, without the chat template")
    add_engine_arguments(generate)
    add_sampling_arguments(generate, max_tokens=64)
    add_log_level_argument(generate, default=argparse.SUPPRESS)
    generate.set_defaults(func=cmd_generate)

    chat = command("chat", help="interactive chat with the model's chat template",
                   description="Interactive chat: history, streaming replies, /help, /reset, /exit.")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(chat)
    add_sampling_arguments(chat, max_tokens=256)
    add_log_level_argument(chat, default=argparse.SUPPRESS)
    chat.set_defaults(func=cmd_chat)

    serve = command("serve", help="OpenAI-compatible HTTP server",
                    description="Serve the OpenAI completions and chat APIs over HTTP.")
    try:
        from octavo.entrypoints.openai.server import add_serve_arguments, run_server
    except ImportError:
        serve.set_defaults(func=lambda args: _unavailable("serve"))
    else:
        add_serve_arguments(serve, log_level_default=argparse.SUPPRESS)
        serve.set_defaults(func=lambda args: run_server(args) or 0)

    bench = command("bench", help="throughput, serving and context-length benchmarks",
                    description="Benchmarks: offline throughput with the peers run in the same process, "
                                "and clients for a running OpenAI-compatible server.")
    add_log_level_argument(bench, default=argparse.SUPPRESS)
    try:
        from octavo.benchmarks.throughput import add_bench_arguments, run_bench
    except ImportError:
        bench.set_defaults(func=lambda args: _unavailable("bench"))
    else:
        add_bench_arguments(bench)
        bench.set_defaults(func=run_bench)
        _add_server_benchmarks(bench)
    _add_watermark_parser(sub)
    return parser


def _add_server_benchmarks(bench: argparse.ArgumentParser) -> None:
    """``bench serve`` and ``bench context-sweep``, beside ``bench throughput``'s sub-commands."""
    from octavo.benchmarks.context_sweep import add_context_sweep_arguments, run_context_sweep
    from octavo.benchmarks.serve import add_serve_bench_arguments, run_serve_bench

    commands = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    commands.metavar = None  # list every sub-command, not only throughput
    serve = commands.add_parser("serve", help="latency and throughput of a running OpenAI-compatible server",
                                description="Stream a standard workload to a server at a Poisson request rate "
                                            "and report TTFT, TPOT, ITL and end-to-end latency.")
    add_serve_bench_arguments(serve)
    serve.set_defaults(func=run_serve_bench)
    sweep = commands.add_parser("context-sweep", help="grow the prompt until the server refuses it",
                                description="Grow the prompt in steps until the server answers 400, then check "
                                            "that it still serves.")
    add_context_sweep_arguments(sweep)
    sweep.set_defaults(func=run_context_sweep)


def _unavailable(command: str) -> int:
    print(f"error: `octavo {command}` is not available in this installation.", file=sys.stderr)
    return 2


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, ``log_level`` resolved: given before or after the command, else the
    command's default (info for serve, whose start-up line is the address it serves on)."""
    args = build_parser().parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command == "serve" else "warning"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.command != "serve":  # the server sets up its own log, with timestamps
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad model path or options: a message, not a traceback
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
