"""The hardware limit for a workload: a lower bound on its time on one device.

Two ceilings are measured on the device in the same run (copy bandwidth and matmul rate),
then the continuous-batching schedule is simulated with every request running from the
start: each decode step reads all weights once plus the KV cache of every running sequence,
and costs 2 x params FLOPs per token plus attention FLOPs; a step takes
``max(bytes / bandwidth, FLOPs / matmul rate)``. Prefill is charged at the matmul rate.
In a mixture-of-experts model only the experts a token is routed to count: ``top_k`` of
each layer's experts in the FLOPs, and in a decode step's bytes the experts its batch touches
(``ModelShape.decode_weight_bytes``).
No engine can beat the bound, so ``measured / bound`` says how much of the machine it uses.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

COPY_BYTES = 2 << 30  # 2 GiB, far beyond any cache
MATMUL_N = 8192
# On CPU the same measurement at full size takes minutes and says little; a smaller one is
# labelled approximate.
_CPU_COPY_BYTES = 256 << 20
_CPU_MATMUL_N = 1024


@dataclass(frozen=True)
class ModelShape:
    """What the bound needs to know about a model."""

    weight_bytes: int  # every parameter, read once per decode step
    flop_params: int  # parameters that take part in matmuls: all but the embedding lookups, lm_head included
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    num_experts: int = 0  # routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 0
    expert_params: int = 0  # parameters of every routed expert of every layer (within flop_params)

    @property
    def active_flop_params(self) -> int:
        """Matmul parameters one token goes through: all but the experts it is not routed to."""
        if not self.num_experts:
            return self.flop_params
        return self.flop_params - self.expert_params + self.expert_params * self.experts_per_token // self.num_experts

    def experts_touched(self, batch: int) -> float:
        """Distinct experts per layer that ``batch`` tokens are routed to, in expectation.

        The choice made here: routing uniform and independent across tokens (what random
        weights give, and a balanced real router nearly so). A token leaves a given expert
        idle with probability ``1 - top_k / E``, so ``E * (1 - (1 - top_k / E) ** batch)`` are
        used: ``top_k`` at batch 1, nearly all by a few times ``E / top_k``. A skewed router
        touches fewer, so the bound could be lower than this for a real model.
        """
        if not self.num_experts:
            return 0.0
        idle = 1.0 - self.experts_per_token / self.num_experts
        return self.num_experts * (1.0 - idle ** batch)

    def decode_weight_bytes(self, batch: int) -> float:
        """Weight bytes a decode step of ``batch`` sequences reads: every dense weight once, and of
        the routed experts only those the batch touches (``experts_touched``)."""
        if not self.num_experts:
            return float(self.weight_bytes)
        expert_bytes = self.expert_params * self.dtype_bytes
        return self.weight_bytes - expert_bytes + expert_bytes * self.experts_touched(batch) / self.num_experts

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_flops_per_context_token(self) -> int:
        """FLOPs one query token spends on one cached token: QK^T and PV, 2 FLOPs per multiply-add."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


def model_shape(hf_config, dtype: torch.dtype) -> ModelShape:
    """Count parameters exactly by building the HF model on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=dtype)  # it writes to the config
    params = {id(p): p.numel() for p in model.parameters()}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids.discard(id(output.weight))  # a tied lm_head is a full matmul every token
    num_heads = hf_config.num_attention_heads
    num_experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0
    # transformers keeps routed experts under ".experts." (stacked or one module each); a
    # shared expert ("shared_expert") runs for every token and counts as dense.
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return ModelShape(
        weight_bytes=sum(params.values()) * dtype.itemsize,
        flop_params=sum(n for key, n in params.items() if key not in embedding_ids),
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        dtype_bytes=dtype.itemsize,
        num_experts=num_experts if expert_params else 0,
        experts_per_token=getattr(hf_config, "num_experts_per_tok", 0) if expert_params else 0,
        expert_params=expert_params,
    )


@dataclass(frozen=True)
class Ceilings:
    copy_bandwidth: float  # bytes/s, bytes read plus bytes written
    matmul_flops: float  # FLOP/s
    matmul_dtype: str
    approximate: bool = False  # measured with smaller sizes (CPU)

    def to_dict(self) -> dict:
        return asdict(self)


def _median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def measure_ceilings(device: torch.device, dtype: torch.dtype, iters: int = 10) -> Ceilings:
    """Copy bandwidth (a 2 GiB device-to-device copy) and matmul rate (an 8192^3 matmul in ``dtype``)."""
    approximate = device.type == "cpu"
    bandwidth = _copy_bandwidth(device, _CPU_COPY_BYTES if approximate else COPY_BYTES, iters)
    flops = _matmul_rate(device, dtype, _CPU_MATMUL_N if approximate else MATMUL_N, iters)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(bandwidth, flops, str(dtype).removeprefix("torch."), approximate)


def _copy_bandwidth(device: torch.device, num_bytes: int, iters: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / _median_seconds(lambda: dst.copy_(src), device, iters)


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _median_seconds(lambda: torch.matmul(a, b, out=out), device, iters)


@dataclass(frozen=True)
class Bound:
    seconds: float
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    memory_bound_steps: int  # decode steps where bytes, not FLOPs, set the time
    output_tokens: int
    total_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return self.total_tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "output_tok_s": self.output_tok_s, "total_tok_s": self.total_tok_s}


def throughput_bound(shape: ModelShape, prompt_lens: Sequence[int], output_lens: Sequence[int],
                     ceilings: Ceilings) -> Bound:
    """Lower-bound time for these requests, all running concurrently from the start.

    Prefill computes every prompt token and yields each request's first output token; decode
    step ``s`` (1-based) then gives every request with ``output_len > s`` its token ``s + 1``,
    attending over ``prompt_len + s`` cached tokens. The batch shrinks as requests finish.
    """
    if len(prompt_lens) != len(output_lens) or not prompt_lens:
        raise ValueError("need one output length per prompt length, and at least one request.")
    attention = shape.attention_flops_per_context_token
    flop_params = shape.active_flop_params
    prefill_flops = sum(2 * flop_params * p + attention * p * (p + 1) // 2 for p in prompt_lens)
    prefill_seconds = prefill_flops / ceilings.matmul_flops

    # Walk the steps with the requests sorted by output length, dropping each as it finishes.
    by_output = sorted(zip(output_lens, prompt_lens))
    running, running_prompt_tokens, finished = len(by_output), sum(prompt_lens), 0
    decode_seconds, memory_bound_steps = 0.0, 0
    steps = max(output_lens) - 1
    for step in range(1, steps + 1):
        while by_output[finished][0] <= step:
            running -= 1
            running_prompt_tokens -= by_output[finished][1]
            finished += 1
        context = running_prompt_tokens + running * step
        memory_seconds = (shape.decode_weight_bytes(running) + shape.kv_bytes_per_token * context) / ceilings.copy_bandwidth
        compute_seconds = (2 * flop_params * running + attention * context) / ceilings.matmul_flops
        memory_bound_steps += memory_seconds >= compute_seconds
        decode_seconds += max(memory_seconds, compute_seconds)
    output_tokens = sum(output_lens)
    return Bound(prefill_seconds + decode_seconds, prefill_seconds, decode_seconds, steps, memory_bound_steps,
                 output_tokens, output_tokens + sum(prompt_lens))
