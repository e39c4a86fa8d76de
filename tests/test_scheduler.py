"""Continuous batching: joining, chunking, preemption, abort, and the KV waste bound."""

from __future__ import annotations

import random

import pytest

from octavo import LLM, SamplingParams
from octavo.engine.request import Sequence, SequenceStatus
from octavo.engine.scheduler import Scheduler
from octavo.kv_cache.manager import KVCacheManager


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(1, prompt_len + 1)), SamplingParams(), max_tokens=8)


def run_step(scheduler: Scheduler):
    """Schedule, pretend the model ran, and give every sequence that finished its prompt a token."""
    batch = scheduler.schedule()
    scheduler.on_step_launched(batch)
    scheduler.cache_full_blocks(batch.seqs)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7, 0.0)
    return batch


def test_chunked_prefill_respects_token_budget_and_decodes_join():
    scheduler = Scheduler(KVCacheManager(64, 4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=10)
    long_seq, short_seq = make_seq(0, 23), make_seq(1, 3)
    scheduler.add(long_seq)
    batch = run_step(scheduler)
    assert batch.num_new_tokens == [10]  # first chunk
    scheduler.add(short_seq)
    batch = run_step(scheduler)
    assert [s.seq_id for s in batch.seqs] == [0] and batch.num_new_tokens == [10]
    batch = run_step(scheduler)
    assert [s.seq_id for s in batch.seqs] == [0, 1] and batch.num_new_tokens == [3, 3]
    batch = run_step(scheduler)  # both decoding together now
    assert batch.num_new_tokens == [1, 1]


def test_preemption_frees_newest_and_requeues_it_first():
    manager = KVCacheManager(6, 4, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq(0, 8), make_seq(1, 8)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # 2 + 2 blocks
    run_step(scheduler)  # a third block each: 6 used
    for _ in range(3):
        run_step(scheduler)
    batch = run_step(scheduler)  # old needs a fourth block: the newer one goes
    assert batch.num_preempted >= 1
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new
    assert old in scheduler.running


def test_max_num_seqs_caps_the_running_batch():
    scheduler = Scheduler(KVCacheManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for seq_id in range(4):
        scheduler.add(make_seq(seq_id, 3))
    assert len(run_step(scheduler)) == 2
    assert scheduler.num_waiting == 2


@pytest.fixture(scope="module")
def llama_folder(tiny_model_factory):
    return tiny_model_factory("llama")[0]


def greedy(max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_new_requests_join_a_running_batch(llama_folder):
    llm = LLM(str(llama_folder), device="cpu", dtype="float32", max_model_len=128, block_size=4)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, greedy(20))
    for _ in range(3):
        engine.step()
    engine.add_request("b", {"prompt_token_ids": [8, 9, 10, 11]}, greedy(5))
    engine.step()
    names = {state.core_id: state.request_id for state in engine.outputs.requests.values()}
    running = {names[seq.request_id] for seq in engine.core.scheduler.running}
    assert running == {"a", "b"}
    first = next(seq for seq in engine.core.scheduler.running if names[seq.request_id] == "a")
    assert first.num_output_tokens == 4  # 1 from the prefill, 3 decodes
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
    alone = llm.generate([{"prompt_token_ids": [8, 9, 10, 11]}], greedy(5), use_tqdm=False)[0]
    assert outputs["b"].outputs[0].token_ids == alone.outputs[0].token_ids


def test_abort_frees_blocks_at_any_time(llama_folder):
    llm = LLM(str(llama_folder), device="cpu", dtype="float32", max_model_len=128, block_size=4,
              max_num_batched_tokens=8)
    engine = llm.llm_engine
    engine.add_request("prefilling", {"prompt_token_ids": list(range(3, 40))}, greedy())
    engine.add_request("waiting", {"prompt_token_ids": list(range(3, 20))}, greedy())
    engine.step()
    assert engine.core.kv_cache.pool.num_used_blocks > 0
    engine.abort_request(["prefilling", "waiting", "unknown-id"])
    assert not engine.has_unfinished_requests()
    assert engine.core.kv_cache.pool.num_used_blocks == 0
    assert engine.step() == []


def test_preempted_requests_finish_with_the_same_greedy_output(llama_folder):
    prompts = [{"prompt_token_ids": [random.Random(i).randrange(3, 200) for _ in range(10 + i)]} for i in range(6)]
    roomy = LLM(str(llama_folder), device="cpu", dtype="float32", max_model_len=64, block_size=4)
    tight = LLM(str(llama_folder), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                num_gpu_blocks_override=20)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy(30), use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, greedy(30), use_tqdm=False)]
    assert tight.llm_engine.core.scheduler.num_preemptions > 0
    assert got == expected


def test_kv_waste_is_under_one_block_per_running_sequence(llama_folder, record_property):
    """PagedAttention's promise: at every step, allocated-but-unfilled slots < block_size per sequence."""
    block_size = 16
    llm = LLM(str(llama_folder), device="cpu", dtype="float32", max_model_len=256, block_size=block_size,
              enable_prefix_caching=False)
    engine = llm.llm_engine
    rng = random.Random(0)
    worst_ratio = 0.0
    for index in range(24):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(5, 60))]
        engine.add_request(str(index), {"prompt_token_ids": prompt}, greedy(rng.randint(5, 80)))
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.core.scheduler.num_running
        if running:
            stats = engine.kv_cache_stats()
            waste = stats.num_wasted_slots
            assert waste == engine.core.scheduler.kv_waste_slots() and stats.num_filled_slots > 0
            assert waste < block_size * running
            worst_ratio = max(worst_ratio, waste / running)
    record_property("peak_kv_waste_slots", engine.core.peak_kv_waste_slots)
    record_property("worst_waste_per_sequence", worst_ratio)
    print(f"peak KV waste: {engine.core.peak_kv_waste_slots} slots over {engine.core.peak_running_at_waste} sequences; "
          f"worst per-sequence average {worst_ratio:.1f} of {block_size} slots")
    assert engine.core.kv_cache.pool.num_used_blocks == 0
