"""The Hugging Face peers, run on the same requests in the same process.

``hf-static``: ``model.generate`` on fixed batches of 64 requests in arrival order, left-padded,
every request in a batch generating as many tokens as the longest one asks for.
``hf-cb``: transformers' continuous batching, ``model.generate_batch`` (paged cache); it takes a
single ``max_new_tokens``, so only workloads whose outputs all have one length can run on it.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from octavo.benchmarks.workloads import Request

STATIC_BATCH_SIZE = 64
PAD_TOKEN_ID = 0


@dataclass
class PeerRun:
    elapsed_s: float  # submission of the first request to completion of the last
    generated_tokens: int  # every token the peer computed, padding waste included
    timing: str  # what elapsed_s spans
    call_s: float  # wall time of the whole timed call(s)
    warmup_s: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_hf_model(hf_config, dtype: torch.dtype, device: torch.device, seed: int):
    """The same architecture with random weights, built directly on the device (sdpa attention).

    MoE models on CUDA run their experts through transformers' ``grouped_mm`` at every step.
    ``generate`` otherwise switches them to ``batched_mm`` for decoding, which copies the weights
    of every token's chosen experts: tens of GiB a layer for a batch of 64 on Mixtral-8x7B, more
    than the card has left beside the 93 GB of weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=dtype, attn_implementation="sdpa")
    if device.type == "cuda" and _is_moe(hf_config):
        _keep_grouped_mm(model)
    return model.eval()


_GROUPED_MM_EVERY_STEP = "grouped_mm_every_step"  # grouped_mm under a name generate() leaves alone


def _keep_grouped_mm(model) -> None:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
    except ImportError:
        return  # a transformers without selectable experts kernels: its own loop over experts
    ALL_EXPERTS_FUNCTIONS.register(_GROUPED_MM_EVERY_STEP, grouped_mm_experts_forward)
    model.set_experts_implementation(_GROUPED_MM_EVERY_STEP)


def _is_moe(hf_config) -> bool:
    return any(getattr(hf_config, name, None) for name in ("num_local_experts", "num_experts"))


def _static_generate(model, batch: list[Request], device: torch.device) -> int:
    """Generate one left-padded batch; returns the number of new tokens per row (checked)."""
    from transformers import GenerationConfig

    width = max(r.prompt_len for r in batch)
    new_tokens = max(r.output_len for r in batch)
    input_ids = torch.tensor([[PAD_TOKEN_ID] * (width - r.prompt_len) + r.prompt_token_ids for r in batch],
                             device=device)
    attention_mask = torch.tensor([[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in batch],
                                  device=device)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=PAD_TOKEN_ID)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    generated = output.shape[1] - width
    if generated != new_tokens:
        raise RuntimeError(f"hf-static generated {generated} tokens per row, expected {new_tokens}.")
    return generated


def run_hf_static(model, requests: list[Request], warmup: list[Request], device: torch.device) -> PeerRun:
    """``model.generate`` over batches of 64 in arrival order, timed as a whole after one warm-up batch."""
    started = time.perf_counter()
    _static_generate(model, warmup, device)
    synchronize(device)
    warmup_s = time.perf_counter() - started

    generated = 0
    with tqdm(total=len(requests), desc="hf-static", unit="req", dynamic_ncols=True) as bar:
        synchronize(device)
        started = time.perf_counter()
        for first in range(0, len(requests), STATIC_BATCH_SIZE):
            batch = requests[first:first + STATIC_BATCH_SIZE]
            generated += _static_generate(model, batch, device) * len(batch)
            bar.update(len(batch))
        synchronize(device)
        elapsed = time.perf_counter() - started
    return PeerRun(elapsed, generated, "whole run", elapsed, warmup_s)


def _generate_batch_kwargs(model, requests: list[Request], device: torch.device) -> dict:
    """Keyword arguments for ``generate_batch`` that this transformers version accepts.

    On CPU the defaults size the paged cache from free memory and pre-run CUDA-graph warm-up
    passes, which takes minutes there; a cache sized for the requests keeps CPU runs short.
    """
    parameters = inspect.signature(model.generate_batch).parameters
    kwargs = {}
    if "progress_bar" in parameters:
        kwargs["progress_bar"] = True
    if device.type == "cpu":
        if "warmup" in parameters:
            kwargs["warmup"] = False
        if "continuous_batching_config" in parameters:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            blocks = sum(math.ceil((r.prompt_len + r.output_len) / 256) for r in requests)
            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
                num_blocks=max(16, blocks), max_batch_tokens=max(256, max(r.prompt_len for r in requests)))
    return kwargs


def _generate_batch(model, requests: list[Request], device: torch.device):
    """One ``generate_batch`` call, with every request checked for exactly its tokens."""
    from transformers import GenerationConfig

    lengths = {r.output_len for r in requests}
    if len(lengths) != 1:
        raise ValueError("hf-cb takes a single max_new_tokens: every request must ask for the same output length.")
    new_tokens = lengths.pop()
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=PAD_TOKEN_ID)
    inputs = [list(r.prompt_token_ids) for r in requests]
    results = model.generate_batch(inputs=inputs, generation_config=config,
                                   **_generate_batch_kwargs(model, requests, device))
    outputs = list(results.values()) if isinstance(results, dict) else list(results)
    # generate_batch logs failures instead of raising, so count what came back.
    failed = [o for o in outputs if getattr(o, "error", None) or len(o.generated_tokens) != new_tokens]
    if len(outputs) != len(requests) or failed:
        detail = getattr(failed[0], "error", None) if failed else None
        raise RuntimeError(
            f"hf-cb returned {len(outputs)} of {len(requests)} requests, {len(failed)} of them without exactly "
            f"{new_tokens} tokens{f' ({detail})' if detail else ''}; see the transformers log above."
        )
    return outputs, new_tokens


def _submission_to_completion(outputs: list) -> float | None:
    """First request creation to last finish, from the per-request stamps when this version keeps them.

    This leaves out the paged-cache allocation and CUDA-graph capture each call does before it
    accepts requests, matching how the other engines are timed.
    """
    try:
        created = min(o.created_time for o in outputs)
        finished = max(o.lifespan[1] for o in outputs)
    except (AttributeError, IndexError, TypeError):
        return None
    return finished - created if finished > created > 0 else None


def run_hf_cb(model, requests: list[Request], warmup: list[Request], device: torch.device) -> PeerRun:
    """``model.generate_batch`` on all requests at once, after one small untimed call."""
    if not hasattr(model, "generate_batch"):
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no generate_batch (needs 5.x).")
    started = time.perf_counter()
    _generate_batch(model, warmup, device)
    synchronize(device)
    warmup_s = time.perf_counter() - started

    synchronize(device)
    started = time.perf_counter()
    outputs, new_tokens = _generate_batch(model, requests, device)
    synchronize(device)
    call_s = time.perf_counter() - started
    stamped = _submission_to_completion(outputs)
    if stamped is None:
        return PeerRun(call_s, new_tokens * len(requests), "whole generate_batch call", call_s, warmup_s)
    return PeerRun(stamped, new_tokens * len(requests), "first request created to last finished", call_s,
                   warmup_s)
