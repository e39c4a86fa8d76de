"""Memory sharing: parallel samples fork blocks, copy-on-write, best_of, prefix caching.

Beam search, which shares blocks between beams, is tested in test_beam_search.py."""

from __future__ import annotations

import random

import pytest

from octavo import LLM, SamplingParams
from tests.conftest import VOCAB_SIZE

PROMPT = [random.Random(5).randrange(3, VOCAB_SIZE) for _ in range(30)]  # 30 % 4 != 0: a partial last block


def make_llm(folder, **overrides) -> LLM:
    kwargs = dict(device="cpu", dtype="float32", max_model_len=128, block_size=4)
    kwargs.update(overrides)
    return LLM(str(folder), **kwargs)


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("llama")[0]


def run_tracking_peak(llm: LLM, prompts, params):
    """Generate while recording the peak number of used KV blocks and the copy-on-write copies."""
    engine = llm.llm_engine
    peak, copies = 0, []
    original = engine.core.runner.launch

    def spy(batch, tables, previous=None):
        nonlocal peak
        peak = max(peak, engine.core.kv_cache.pool.num_used_blocks)
        copies.extend(batch.block_copies)
        return original(batch, tables, previous)

    engine.core.runner.launch = spy
    try:
        return llm.generate(prompts, params, use_tqdm=False), peak, copies
    finally:
        engine.core.runner.launch = original


@pytest.mark.parametrize("n", [2, 4])
def test_parallel_samples_match_separate_seeded_requests_with_fewer_blocks(folder, n):
    llm = make_llm(folder, enable_prefix_caching=False)
    shared, shared_peak, copies = run_tracking_peak(
        llm, [{"prompt_token_ids": PROMPT}], SamplingParams(n=n, temperature=1.0, seed=7, max_tokens=10,
                                                            ignore_eos=True))
    separate, separate_peak, _ = run_tracking_peak(
        llm, [{"prompt_token_ids": PROMPT}] * n,
        [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=10, ignore_eos=True) for i in range(n)])
    assert [c.token_ids for c in shared[0].outputs] == [o.outputs[0].token_ids for o in separate]
    # Copy-on-write: the shared, partly filled last prompt block was copied for n - 1 of the samples.
    assert len(copies) == n - 1
    assert shared_peak < separate_peak
    assert llm.llm_engine.core.kv_cache.pool.num_used_blocks == 0


def test_copy_on_write_keeps_forks_apart_greedy(folder):
    """Greedy forks write identical tokens; different seeds write different ones. Either way each fork's
    K/V must stay its own: every sample equals the same request run unshared."""
    llm = make_llm(folder, enable_prefix_caching=False, block_size=8)
    params = SamplingParams(n=3, temperature=0.7, seed=11, max_tokens=20, ignore_eos=True)
    shared = llm.generate({"prompt_token_ids": PROMPT[:13]}, params, use_tqdm=False)[0]
    for index, completion in enumerate(shared.outputs):
        alone = llm.generate({"prompt_token_ids": PROMPT[:13]},
                             SamplingParams(temperature=0.7, seed=11 + index, max_tokens=20, ignore_eos=True),
                             use_tqdm=False)[0]
        assert completion.token_ids == alone.outputs[0].token_ids


def test_best_of_returns_the_most_likely_samples(folder):
    llm = make_llm(folder)
    output = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    singles = [llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=1.0, seed=3 + i, max_tokens=8, ignore_eos=True, logprobs=0), use_tqdm=False)[0].outputs[0]
        for i in range(5)]
    best = sorted(singles, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in best]
    assert [c.index for c in output.outputs] == [0, 1]


def test_prefix_cache_hit_skips_compute_and_keeps_outputs(folder):
    llm = make_llm(folder)
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    computed_before = engine.core.num_prefill_tokens_computed
    second = llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)[0]
    assert second.num_cached_tokens == 28  # 7 full blocks of 4; the partial block is recomputed
    assert engine.core.num_prefill_tokens_computed - computed_before == 2
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    stats = engine.kv_cache_stats()
    assert stats.prefix_cache_hits == 28 and stats.prefix_cache_queries == 60
    uncached = make_llm(folder, enable_prefix_caching=False)
    assert uncached.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)[0].outputs[0].token_ids == \
        first.outputs[0].token_ids


def test_cache_salt_isolates_tenants(folder):
    llm = make_llm(folder)
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "tenant-a"}, greedy, use_tqdm=False)
    other = llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "tenant-b"}, greedy, use_tqdm=False)[0]
    unsalted = llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)[0]
    same = llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "tenant-a"}, greedy, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert same.num_cached_tokens == 28


def test_eviction_under_memory_pressure_keeps_outputs_correct(folder):
    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(10, 40))]}
               for _ in range(12)]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    roomy = make_llm(folder, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy, use_tqdm=False)]
    tight = make_llm(folder, num_gpu_blocks_override=40)
    for _ in range(2):  # the second pass hits what the first left cached, and evicts as it goes
        got = [o.outputs[0].token_ids for o in tight.generate(prompts + prompts[:3], greedy, use_tqdm=False)]
        assert got == expected + expected[:3]
    assert tight.llm_engine.core.kv_cache.pool.num_evictions > 0
    assert tight.llm_engine.kv_cache_stats().prefix_cache_hits > 0


def test_forked_samples_count_towards_max_num_seqs(folder):
    llm = make_llm(folder, max_num_seqs=3)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": PROMPT}, SamplingParams(n=2, max_tokens=6, ignore_eos=True))
    engine.add_request("b", {"prompt_token_ids": PROMPT[:9]}, SamplingParams(n=2, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
        assert engine.core.scheduler.num_running <= 3
