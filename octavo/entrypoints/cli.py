"""The ``octavo`` command: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional, Union

from octavo.sampling_params import SamplingParams


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


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


def add_engine_arguments(parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup],
                         model_positional: bool = False) -> None:
    """Model and engine flags shared by every subcommand (serve included)."""
    help_model = "HF model folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)"
    if model_positional:
        parser.add_argument("model", nargs="?", default=None, help=help_model)
    else:
        parser.add_argument("--model", "-m", default=None, help=help_model)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
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
    parser.add_argument("--load-format", default="auto",
                        help="auto | safetensors | gguf | dummy | pt (pickles also need --allow-pickle-weights)")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="load pickled *.bin/*.pt weights (they can run code: only for trusted sources)")
    parser.add_argument("--gguf-weights", default="auto", choices=("auto", "packed", "float32"),
                        help="GGUF 4-bit matrices on CPU: kept in their blocks (packed; auto does so for float32 "
                             "CPU runs) or decoded to float32, the reference (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="engine seed (default: 0)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager, load_format=args.load_format,
        allow_pickle_weights=args.allow_pickle_weights, seed=args.seed,
        async_scheduling=False if args.no_async_scheduling else None, gguf_weights=args.gguf_weights,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def stream_completion(llm, prompt, params: SamplingParams) -> str:
    """Run one request to completion, printing text as it arrives; Ctrl-C stops it early."""
    engine = llm.llm_engine
    request_id = f"cli-{id(params)}-{len(engine.requests)}"
    engine.add_request(request_id, prompt, params)
    state = engine.requests[request_id]
    detokenizer = state.detokenizers[0]
    try:
        while not state.finished:
            engine.step()
            sys.stdout.write(detokenizer.take_stream_delta(finished=state.finished))
            sys.stdout.flush()
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return detokenizer.text


def cmd_generate(args: argparse.Namespace) -> int:
    from octavo.llm import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    for prompt in args.prompt:
        if len(args.prompt) > 1:
            print(f"--- {prompt}")
        sys.stdout.write(prompt)
        stream_completion(llm, prompt, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from octavo.llm import LLM

    llm = LLM(**engine_kwargs(args))
    tokenizer = llm.get_tokenizer()
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        print("error: this model has no chat template; use `octavo generate`.", file=sys.stderr)
        return 2
    params = sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chatting. /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
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
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        try:
            reply = stream_completion(llm, {"prompt_token_ids": list(prompt_ids)}, params)
        except ValueError as error:  # e.g. the history outgrew the context
            history.pop()
            print(f"error: {error} Use /reset to start over.")
            continue
        history.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octavo", description="High-throughput LLM inference and serving.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG | INFO | WARNING (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench}")

    generate = sub.add_parser("generate", help="complete prompts, streaming the text",
                              description="Complete each prompt and stream the text to stdout.")
    generate.add_argument("prompt", nargs="+", help="prompt text (several prompts run one after another)")
    add_engine_arguments(generate)
    add_sampling_arguments(generate, max_tokens=64)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template",
                          description="Interactive chat: history, streaming replies, /reset, /exit.")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(chat)
    add_sampling_arguments(chat, max_tokens=256)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve the OpenAI completions and chat APIs over HTTP.")
    try:
        from octavo.entrypoints.openai.server import add_serve_arguments, run_server
    except ImportError:
        serve.set_defaults(func=lambda args: _unavailable("serve"))
    else:
        add_serve_arguments(serve)
        serve.set_defaults(func=lambda args: run_server(args) or 0)

    bench = sub.add_parser("bench", help="throughput benchmarks",
                           description="Benchmarks with the peers run in the same process.")
    try:
        from octavo.benchmarks.throughput import add_bench_arguments, run_bench
    except ImportError:
        bench.set_defaults(func=lambda args: _unavailable("bench"))
    else:
        add_bench_arguments(bench)
        bench.set_defaults(func=run_bench)
    return parser


def _unavailable(command: str) -> int:
    print(f"error: `octavo {command}` is not available in this installation.", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad model path or options: a message, not a traceback
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
