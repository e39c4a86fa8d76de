"""Tensor parallelism on CPU (gloo, worker processes): greedy tokens and logprobs equal the
single-process engine's, under paging stress too; a dead worker fails the engine loudly; a
split the model cannot take is refused with a clear error."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.config import EngineConfig
from octavo.engine.core_client import EngineDeadError
from octavo.engine.messages import decode_startup, encode_startup
from tests.conftest import DENSE_FAMILIES, VOCAB_SIZE
from tests.test_parity import LOGPROB_ATOL, engine_greedy, make_llm, random_prompts

# Every family. mistral, gemma and the multi-query GPT-BigCode / Falcon models have one
# key/value head: with two ranks each keeps a copy. bloom splits its ALiBi slopes by head.
# The MoE models split every expert's intermediate rows.
TP_ARCHITECTURES = ["llama", "qwen2", "qwen3", "gpt2", "mistral"] + DENSE_FAMILIES + ["mixtral", "qwen2_moe",
                                                                                     "qwen3_moe"]
STRESS = dict(num_gpu_blocks_override=40, max_num_batched_tokens=16)  # preemption and chunked prefill


def assert_same(got, expected, logprob_atol: float = LOGPROB_ATOL) -> None:
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_logprobs), (_, expected_logprobs) in zip(got, expected):
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(expected_logprobs),
                                   atol=logprob_atol, rtol=0)


def greedy_and_prompt_logprobs(llm: LLM, prompts):
    """Greedy outputs of every prompt, and the full prompt logprob table of the longest one."""
    greedy = engine_greedy(llm, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=VOCAB_SIZE)
    prompt_logprobs = llm.generate({"prompt_token_ids": prompts[1]}, params, use_tqdm=False)[0].prompt_logprobs
    table = torch.tensor([[entry[token].logprob for token in range(VOCAB_SIZE)] for entry in prompt_logprobs[1:]])
    return greedy, table


def single_and_split(folder: Path, tensor_parallel_size: int, logprob_atol: float = LOGPROB_ATOL, **settings):
    prompts = random_prompts()
    single = make_llm(folder, **settings)
    expected = greedy_and_prompt_logprobs(single, prompts)
    single.shutdown()
    split = make_llm(folder, tensor_parallel_size=tensor_parallel_size, **settings)
    try:
        core = split.llm_engine.core
        core.kv_cache.pool.shuffle_free_queue(random.Random(1))
        got = greedy_and_prompt_logprobs(split, prompts)
        num_preemptions = core.scheduler.num_preemptions
        assert core.runner.kv_caches[0].shape[3] == max(1, single_kv_heads(single) // tensor_parallel_size)
    finally:
        split.shutdown()
    assert_same(got[0], expected[0], logprob_atol)
    torch.testing.assert_close(got[1], expected[1], atol=logprob_atol, rtol=0)
    return num_preemptions


def single_kv_heads(llm: LLM) -> int:
    return llm.llm_engine.core.runner.num_kv_heads


@pytest.mark.parametrize("arch", TP_ARCHITECTURES)
def test_two_ranks_match_one_under_paging_stress(arch, tiny_model_factory):
    folder, _ = tiny_model_factory(arch)
    assert single_and_split(folder, 2, **STRESS) > 0, "the KV budget was meant to force preemption"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gptj"])
def test_two_ranks_match_one_with_online_fp8_weights(arch, tiny_model_factory):
    """FP8 layers split too: rows scaled before the split, row-parallel activations scaled over
    every rank's columns, so both engines quantize the same values. The ranks' partial sums add
    in another order, and FP8's 3-bit mantissa turns such last-bit differences into an occasional
    step of one FP8 unit in a later layer's activations: greedy tokens stay equal, logprobs
    agree to a few hundredths (a split that scaled activations per rank misses by far more)."""
    folder, _ = tiny_model_factory(arch)
    single_and_split(folder, 2, logprob_atol=0.1, quantization="fp8", **STRESS)


def test_two_ranks_match_one_with_asynchronous_scheduling(tiny_model_factory):
    """Steps whose input tokens are still on the device (the previous step in flight) reach the
    workers filled in: rank 0 broadcasts its device-side inputs."""
    folder, _ = tiny_model_factory("qwen3")
    single_and_split(folder, 2, async_scheduling=True, **STRESS)


def test_two_ranks_match_one_with_default_settings(tiny_model_factory):
    folder, _ = tiny_model_factory("llama")
    single_and_split(folder, 2, block_size=16, max_model_len=None, kv_cache_memory=64 << 20)


@pytest.mark.slow  # four worker processes start on two cores
def test_four_ranks_replicate_key_value_heads(tiny_model_factory):
    """llama has 4 query and 2 key/value heads: each of 4 ranks keeps one query head and a copy of a KV head."""
    folder, _ = tiny_model_factory("llama")
    single_and_split(folder, 4, **STRESS)


def test_two_ranks_through_the_core_process(tiny_model_factory):
    """The config crosses into the core process with its tensor_parallel_size; same tokens."""
    folder, _ = tiny_model_factory("qwen3")
    prompts = random_prompts()
    single = make_llm(folder)
    expected = engine_greedy(single, prompts)
    single.shutdown()
    split = make_llm(folder, engine_core_process=True, tensor_parallel_size=2)
    try:
        assert_same(engine_greedy(split, prompts), expected)
        core_pid = split.llm_engine.core_client._process.process.pid
        workers = _children(core_pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="worker rank 1 exited"):
            engine_greedy(split, prompts)
    finally:
        split.shutdown()


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def test_a_killed_worker_fails_the_engine_loudly(tiny_model_factory):
    folder, _ = tiny_model_factory("llama")
    llm = make_llm(folder, tensor_parallel_size=2)
    try:
        worker = llm.llm_engine.core.tensor_parallel.processes[0]
        worker.kill()
        worker.wait()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="worker rank 1 exited with code -9"):
            engine_greedy(llm, random_prompts())
        assert time.monotonic() - started < 10
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch, size, message", [
    ("llama", 3, r"number of attention heads \(4\) is not divisible by tensor_parallel_size \(3\)"),
    ("llama", 8, r"number of attention heads \(4\) is not divisible by tensor_parallel_size \(8\)"),
])
def test_a_split_the_model_cannot_take_is_refused(arch, size, message, tiny_model_factory):
    folder, _ = tiny_model_factory(arch)
    with pytest.raises(ValueError, match=message):
        make_llm(folder, tensor_parallel_size=size)


def test_quantized_formats_that_cannot_split_are_refused(tiny_model_factory, tmp_path):
    import json

    folder, _ = tiny_model_factory("llama")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq weights do not support tensor parallelism yet"):
        make_llm(tmp_path, tensor_parallel_size=2, load_format="dummy")


def test_tensor_parallel_size_is_checked_and_reaches_the_core_process():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(model="m", tensor_parallel_size=0)
    config, _ = decode_startup(encode_startup(EngineConfig(model="m", tensor_parallel_size=2), frozenset({2})))
    assert config.tensor_parallel_size == 2
