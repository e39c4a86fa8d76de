"""The standard offline workloads: the models and the requests every engine runs identically.

The recipe is fixed so that figures from different engines, runs and machines describe the
same requests: one ``random.Random(seed)``, and per request its prompt length, its output
length, then its prompt token ids, in that order. The models are real architectures with
random weights: throughput does not depend on weight values once output lengths are fixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

# Token ids are drawn from [10, min(vocab, 32000)): clear of the special ids at the bottom of
# most vocabularies and valid for every model with at least that many tokens.
_LOWEST_TOKEN_ID = 10
_HIGHEST_TOKEN_BOUND = 32000


@dataclass(frozen=True)
class WorkloadSpec:
    """Name, default request count, and inclusive prompt / output length ranges."""

    name: str
    num_prompts: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]

    def with_overrides(self, num_prompts: int | None = None, prompt_len: tuple[int, int] | None = None,
                       output_len: tuple[int, int] | None = None) -> WorkloadSpec:
        """The same workload with some fields replaced (smaller runs, tests)."""
        spec = WorkloadSpec(
            self.name,
            self.num_prompts if num_prompts is None else num_prompts,
            self.prompt_len if prompt_len is None else tuple(prompt_len),
            self.output_len if output_len is None else tuple(output_len),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"the number of prompts must be >= 1, got {self.num_prompts}.")
        for label, (lo, hi) in (("prompt", self.prompt_len), ("output", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{label} length range must satisfy 1 <= lo <= hi, got {lo}..{hi}.")


WORKLOADS: dict[str, WorkloadSpec] = {
    "fixed": WorkloadSpec("fixed", 512, (100, 1024), (256, 256)),
    "var": WorkloadSpec("var", 256, (100, 1024), (100, 1024)),
}


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def build_requests(spec: WorkloadSpec, vocab_size: int, seed: int = 0) -> list[Request]:
    """The workload's requests, in arrival order, exactly as the published recipe draws them."""
    rng = random.Random(seed)
    token_bound = min(vocab_size, _HIGHEST_TOKEN_BOUND)
    if token_bound <= _LOWEST_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} is too small: prompt ids are drawn from [10, vocab_size).")
    requests = []
    for _ in range(spec.num_prompts):
        prompt_len = rng.randint(*spec.prompt_len)
        output_len = rng.randint(*spec.output_len)
        prompt = [rng.randrange(_LOWEST_TOKEN_ID, token_bound) for _ in range(prompt_len)]
        requests.append(Request(prompt, output_len))
    return requests


def warmup_requests(requests: list[Request], vocab_size: int, seed: int, count: int = 4,
                    max_output: int = 8) -> list[Request]:
    """A few short requests shaped like the workload's shortest and longest prompts.

    Their ids come from another random stream so they share no prefix with the timed prompts
    (a prefix-cache hit would make the timed run cheaper than the workload says).
    """
    rng = random.Random(f"warm-up {seed}")
    token_bound = min(vocab_size, _HIGHEST_TOKEN_BOUND)
    by_length = sorted(requests, key=lambda r: r.prompt_len)
    picks = [by_length[round(i * (len(by_length) - 1) / max(count - 1, 1))] for i in range(count)]
    return [Request([rng.randrange(_LOWEST_TOKEN_ID, token_bound) for _ in range(r.prompt_len)],
                    min(max_output, r.output_len)) for r in picks]


def longest_request(requests: list[Request]) -> int:
    """Prompt plus output tokens of the longest request: the context the engines must hold."""
    return max(r.prompt_len + r.output_len for r in requests)


DUMMY_PREFIX = "dummy:"

# config.json values from the public model cards.
DUMMY_MODELS: dict[str, tuple[str, dict]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        architectures=["Qwen3ForCausalLM"], hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
        bos_token_id=151643, eos_token_id=151645, dtype="bfloat16",
    )),
    "llama3-8b": ("LlamaConfig", dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
        bos_token_id=128000, eos_token_id=128001, dtype="bfloat16",
    )),
    # 46.7B parameters, 12.9B of them used per token (2 of 8 experts): 93 GB in bf16, one H200.
    "mixtral-8x7b": ("MixtralConfig", dict(
        architectures=["MixtralForCausalLM"], hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=None,
        bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )),
}


def dummy_config(name: str):
    """The transformers config object of a standard benchmark model."""
    if name not in DUMMY_MODELS:
        raise ValueError(f"unknown dummy model {name!r}; choose from {', '.join(sorted(DUMMY_MODELS))}.")
    import transformers

    class_name, values = DUMMY_MODELS[name]
    return getattr(transformers, class_name)(**values)


# quantization_config of a typical checkpoint in each format, so dummy weights take its layout.
DUMMY_QUANTIZATIONS: dict[str, dict] = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
}


def write_dummy_model(name: str, folder: Path, quantization: str = "auto") -> Path:
    """Save the model's config.json (no weights) into ``folder``, for ``load_format="dummy"``;
    ``quantization`` gptq or awq adds that format's ``quantization_config``."""
    config = dummy_config(name)
    if quantization in DUMMY_QUANTIZATIONS:
        config.quantization_config = dict(DUMMY_QUANTIZATIONS[quantization])
    config.save_pretrained(folder)
    return folder
