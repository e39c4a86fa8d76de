"""Host time of one decode step: everything the engine does besides running the model.

    python -m octavo.benchmarks.host_overhead --num-seqs 512

Scheduling, input preparation, sampling bookkeeping, stop checks and block accounting run
in Python on the host. On a GPU they must fit inside the device time of a step for the
asynchronous scheduler to hide them; this measures them alone, on any machine, by replacing
the model's forward pass and LM head with stubs that return zeros of the right shapes.
The vocabulary is small on purpose: work over the logits (argmax, softmax) is device work on
a GPU, and on the CPU it would drown the bookkeeping this is meant to show.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from octavo import LLM, SamplingParams


def _tiny_config(vocab_size: int):
    from transformers import Qwen3Config

    return Qwen3Config(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       vocab_size=vocab_size, max_position_embeddings=4096)


def measure(num_seqs: int, prompt_len: int, steps: int, async_scheduling: bool, vocab_size: int) -> float:
    """Milliseconds of host time per decode step with ``num_seqs`` running sequences."""
    folder = Path(tempfile.mkdtemp(prefix="octavo-host-"))
    _tiny_config(vocab_size).save_pretrained(folder)
    llm = LLM(str(folder), load_format="dummy", device="cpu", dtype="float32", skip_tokenizer_init=True,
              max_model_len=prompt_len + steps + 16, max_num_seqs=num_seqs, async_scheduling=async_scheduling,
              max_num_batched_tokens=max(8192, num_seqs * prompt_len), engine_core_process=False)
    engine = llm.llm_engine
    hidden_size = engine.core.model.config.hidden_size
    engine.core.model.forward = lambda input_ids, positions, metadata: torch.zeros(input_ids.shape[0], hidden_size)
    engine.core.model.compute_logits = lambda hidden: torch.zeros(hidden.shape[0], vocab_size)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for index in range(num_seqs):
        engine.add_request(str(index), {"prompt_token_ids": [rng.randrange(10, vocab_size) for _ in range(prompt_len)]},
                           params, stream=False)
    for _ in range(4):  # the prefill, then a few decode steps to settle
        engine.step()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - started) / steps * 1e3


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    print(f"{'sequences':>9}  {'plain steps':>12}  {'async steps':>12}   (host ms per decode step)")
    for num_seqs in args.num_seqs:
        plain = measure(num_seqs, args.prompt_len, args.steps, False, args.vocab_size)
        pipelined = measure(num_seqs, args.prompt_len, args.steps, True, args.vocab_size)
        print(f"{num_seqs:>9}  {plain:>12.2f}  {pipelined:>12.2f}")


if __name__ == "__main__":
    main()
