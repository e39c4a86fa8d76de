"""Greedy outputs, their logprobs and prompt logits match Hugging Face transformers, under paging
stress, for every architecture of ``tests.conftest.ARCHITECTURES``."""

from __future__ import annotations

import os
import random

import pytest
import torch

from octavo import LLM, SamplingParams
from tests.conftest import ARCHITECTURES, VOCAB_SIZE

MAX_NEW_TOKENS = 12
# OCTAVO_TEST_DEVICE=cuda runs the same checks on a GPU (Triton kernels, CUDA graphs).
DEVICE = os.environ.get("OCTAVO_TEST_DEVICE", "cpu")


def random_prompts(count: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 40, 7, 23, 1, 31, 12, 17][:count]
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(length)] for length in lengths]


LOGPROB_ATOL = 1e-4


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy decoding with EOS disabled (the engine side uses ignore_eos): the
    tokens and the log-softmax of each one under the logits that chose it."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    model.generation_config.eos_token_id = None  # otherwise merged back in from the saved model
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=config,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1)[token].item() for step, token in zip(out.logits, tokens)]
    return tokens, logprobs


def make_llm(folder, **overrides) -> LLM:
    # In this process, so the tests can look inside the core; one test runs across processes.
    kwargs = dict(dtype="float32", device=DEVICE, max_model_len=64, block_size=4, max_num_seqs=8,
                  engine_core_process=False)
    if DEVICE != "cpu":
        kwargs["gpu_memory_utilization"] = 0.1  # several engines share the card
    kwargs.update(overrides)
    return LLM(str(folder), **kwargs)


def engine_greedy(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)]
        results.append((completion.token_ids, logprobs))
    return results


def assert_matches_hf(got: list[tuple[list[int], list[float]]],
                      expected: list[tuple[list[int], list[float]]]) -> None:
    """Token for token, and every chosen token's logprob within LOGPROB_ATOL."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_logprobs), (_, expected_logprobs) in zip(got, expected):
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(expected_logprobs),
                                   atol=LOGPROB_ATOL, rtol=0)


@pytest.fixture(scope="module")
def hf_references(tiny_model_factory):
    references = {}
    prompts = random_prompts()
    for arch in ARCHITECTURES:
        folder, model = tiny_model_factory(arch)
        references[arch] = [hf_greedy(model, prompt, MAX_NEW_TOKENS) for prompt in prompts]
    return references


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf_under_paging_stress(arch, async_scheduling, tiny_model_factory, hf_references):
    folder, _ = tiny_model_factory(arch)
    prompts = random_prompts()
    # 40 blocks of 4 tokens cannot hold 8 sequences of up to 52 tokens: forces preemption.
    # 16 tokens a step forces the longer prompts into several chunks. With asynchronous
    # scheduling, preemption and chunking happen while the previous step is in flight.
    llm = make_llm(folder, num_gpu_blocks_override=40, max_num_batched_tokens=16,
                   async_scheduling=async_scheduling)
    engine = llm.llm_engine
    engine.core.kv_cache.pool.shuffle_free_queue(random.Random(1))

    chunked = []
    non_contiguous = []
    pending_inputs = []
    original_launch = engine.core.runner.launch

    def spying_launch(batch, block_tables, previous=None):
        for seq, num_new, table in zip(batch.seqs, batch.num_new_tokens, block_tables):
            if seq.num_output_tokens == 0 and num_new < seq.num_prompt_tokens:
                chunked.append(seq.seq_id)
            if any(b - a != 1 for a, b in zip(table, table[1:])):
                non_contiguous.append(seq.seq_id)
            if seq.num_pending_tokens:
                pending_inputs.append(seq.seq_id)
        return original_launch(batch, block_tables, previous)

    engine.core.runner.launch = spying_launch
    assert_matches_hf(engine_greedy(llm, prompts), hf_references[arch])
    # Asynchronous steps take their input tokens from the step still in flight.
    assert bool(pending_inputs) == async_scheduling
    assert engine.core.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert chunked, "the token budget was meant to force chunked prefill"
    assert non_contiguous, "shuffled free list should give non-contiguous block tables"
    assert engine.core.kv_cache.pool.num_free_blocks == engine.core.kv_cache.pool.num_blocks
    engine.core.kv_cache.pool.check_invariants()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf_default_settings(arch, tiny_model_factory, hf_references):
    folder, _ = tiny_model_factory(arch)
    llm = make_llm(folder, block_size=16, max_model_len=None, kv_cache_memory=64 << 20)
    assert_matches_hf(engine_greedy(llm, random_prompts()), hf_references[arch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_logprobs_match_hf_logits(arch, tiny_model_factory):
    """Full-vocabulary log-softmax at every prompt position equals transformers' within 1e-4."""
    folder, model = tiny_model_factory(arch)
    prompt = random_prompts()[1]
    llm = make_llm(folder, max_num_batched_tokens=16)  # chunked: logits gathered over 3 steps
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=VOCAB_SIZE)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert output.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry = output.prompt_logprobs[position]
        got = torch.tensor([entry[token].logprob for token in range(VOCAB_SIZE)])
        torch.testing.assert_close(got, expected[position - 1], atol=LOGPROB_ATOL, rtol=0)
        assert entry[prompt[position]].rank == int((expected[position - 1] > expected[position - 1][prompt[position]]).sum()) + 1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_hf_through_the_core_process(arch, tiny_model_factory, hf_references):
    """The engine core in its own process (the default on CUDA) gives the same tokens."""
    folder, _ = tiny_model_factory(arch)
    llm = make_llm(folder, engine_core_process=True, async_scheduling=True)
    assert llm.llm_engine.core is None  # really across the process boundary
    assert_matches_hf(engine_greedy(llm, random_prompts()), hf_references[arch])


def test_longrope_long_factors_match_hf(tiny_model_factory):
    """Phi-3's LongRoPE past its original 16 positions. Every sequence here is either longer
    than 16 from its prompt on (long factors throughout) or stays within 16 (short factors), so
    transformers never recomputes one, and prompts are prefilled whole (no chunking)."""
    folder, model = tiny_model_factory("phi3_long")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(length)] for length in (17, 30, 41, 3)]
    llm = make_llm(folder)
    assert_matches_hf(engine_greedy(llm, prompts), [hf_greedy(model, p, MAX_NEW_TOKENS) for p in prompts])
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=VOCAB_SIZE)
    output = llm.generate({"prompt_token_ids": prompts[2]}, params, use_tqdm=False)[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompts[2]])).logits[0].float(), dim=-1)
    got = torch.tensor([[entry[token].logprob for token in range(VOCAB_SIZE)]
                        for entry in output.prompt_logprobs[1:]])
    torch.testing.assert_close(got, expected[:-1], atol=LOGPROB_ATOL, rtol=0)
