"""Asynchronous scheduling (step k+1 planned while step k is in flight) against plain steps.

On the CPU nothing overlaps, but the bookkeeping is the same as on a GPU: input tokens taken
from the step in flight, tokens that arrive one step late, a stop discovered after the next
step was already queued, aborts and preemption in between. Every output must equal the
output of plain, synchronous steps.
"""

from __future__ import annotations

import os
import random

import pytest

from octavo import LLM, SamplingParams

NUM_PROMPTS = 7
# OCTAVO_TEST_DEVICE=cuda runs the same checks on a GPU, where the steps really overlap.
DEVICE = os.environ.get("OCTAVO_TEST_DEVICE", "cpu")


def make_llm(folder, async_scheduling: bool, **overrides) -> LLM:
    kwargs = dict(dtype="float32", device=DEVICE, max_model_len=96, block_size=4, max_num_seqs=8,
                  async_scheduling=async_scheduling, engine_core_process=False)  # the tests look inside
    if DEVICE != "cpu":
        kwargs["gpu_memory_utilization"] = 0.1  # several engines share the card
    kwargs.update(overrides)
    return LLM(str(folder), **kwargs)


def prompts(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(rng.randint(2, 30))]}
            for _ in range(NUM_PROMPTS)]


def summary(outputs) -> list[tuple]:
    """Everything but the float logprobs, which differ in the last bits when batches differ."""
    return [
        (tuple((c.token_ids, c.text, c.finish_reason, c.stop_reason,
                None if c.logprobs is None else [sorted((k, v.rank) for k, v in d.items()) for d in c.logprobs])
               for c in o.outputs),
         None if o.prompt_logprobs is None else [d and sorted((k, v.rank) for k, v in d.items())
                                                 for d in o.prompt_logprobs])
        for o in outputs
    ]


def logprob_values(outputs) -> list[float]:
    values = []
    for o in outputs:
        for c in o.outputs:
            values.append(c.cumulative_logprob or 0.0)
            values += [v.logprob for d in c.logprobs or [] for _, v in sorted(d.items())]
    return values


def mixed_params(stop_tokens: list[int], stop_text: str) -> list[SamplingParams]:
    """One of each kind of request. Only n=2 needs every token on the host, and it finishes
    after 3 tokens, so the stops and penalties run in pipelined steps."""
    return [
        SamplingParams(temperature=0.0, max_tokens=20, prompt_logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=17, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=stop_tokens),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop_text], min_tokens=2),
        SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=3),
        # Negative presence/frequency penalties make the tiny model repeat what it said, so the
        # tokens depend on counting the newest one, which is still on the device when sampled.
        SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.1, presence_penalty=-1.0,
                       frequency_penalty=-0.5),
        SamplingParams(temperature=0.7, seed=5, max_tokens=24, presence_penalty=-1.0),
    ]


@pytest.fixture(scope="module")
def model_folder(tiny_model_factory):
    folder, _ = tiny_model_factory("llama", with_tokenizer=True)
    return folder


def test_async_outputs_equal_sync_outputs(model_folder):
    sync_llm = make_llm(model_folder, async_scheduling=False)
    # Stops chosen from what greedy decoding really produces, so they fire mid-generation.
    greedy = sync_llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    stop_tokens = [greedy[2].outputs[0].token_ids[6]]
    stop_text = greedy[3].outputs[0].text[8:11]
    assert stop_text.strip(), "the stop string must be real text"
    params = mixed_params(stop_tokens, stop_text)

    expected = sync_llm.generate(prompts(), params, use_tqdm=False)
    async_llm = make_llm(model_folder, async_scheduling=True)
    pipelined = []
    original = async_llm.llm_engine.core.runner.launch

    def spy(batch, tables, previous=None):
        pipelined.append(previous is not None)
        return original(batch, tables, previous)

    async_llm.llm_engine.core.runner.launch = spy
    got = async_llm.generate(prompts(), params, use_tqdm=False)
    assert not pipelined[0] and any(pipelined), "plain steps first (n=2, penalties), then pipelined ones"
    assert summary(got) == summary(expected)
    assert logprob_values(got) == pytest.approx(logprob_values(expected), abs=1e-4)
    assert expected[2].outputs[0].finish_reason == "stop" and expected[3].outputs[0].finish_reason == "stop"
    assert len(expected[2].outputs[0].token_ids) < 30

    engine = async_llm.llm_engine
    assert engine.core._in_flight is None
    assert engine.core.kv_cache.pool.num_used_blocks == 0


def test_async_pipeline_runs_when_no_request_needs_the_host(model_folder):
    llm = make_llm(model_folder, async_scheduling=True)
    engine = llm.llm_engine
    launches = []
    original = engine.core.runner.launch

    def spy(batch, tables, previous=None):
        launches.append(previous is not None)
        return original(batch, tables, previous)

    engine.core.runner.launch = spy
    llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert sum(launches) >= len(launches) - 2, "steps should be queued behind the one in flight"

    launches.clear()
    llm.generate(prompts(), SamplingParams(temperature=0.5, seed=1, max_tokens=10, n=2), use_tqdm=False)
    assert sum(launches) >= len(launches) - 2, "parallel samples fork with a step in flight too"


def test_abort_with_a_step_in_flight(model_folder):
    reference = make_llm(model_folder, async_scheduling=False).generate(
        prompts(1), SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    llm = make_llm(model_folder, async_scheduling=True)
    engine = llm.llm_engine
    for index, prompt in enumerate(prompts(1)):
        engine.add_request(str(index), prompt, SamplingParams(temperature=0.0, max_tokens=16))
    finished = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        steps += 1
        if steps == 4:
            assert engine.core._in_flight is not None
            engine.abort_request(["1", "4"])
            # The id is free again at once; the new request must not pick up the old tokens.
            engine.add_request("1", prompts(1)[1], SamplingParams(temperature=0.0, max_tokens=16))
    assert "4" not in finished
    for request_id, output in finished.items():
        assert output.outputs[0].token_ids == reference[int(request_id)].outputs[0].token_ids
    assert engine.core.kv_cache.pool.num_used_blocks == 0
    assert all(seq.num_pending_tokens == 0 for seq in engine.core.scheduler.running)


def test_streaming_with_async_scheduling_matches_final_text(model_folder):
    llm = make_llm(model_folder, async_scheduling=True)
    engine = llm.llm_engine
    engine.add_request("s", prompts()[0], SamplingParams(temperature=0.0, max_tokens=12))
    seen = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.append(list(output.outputs[0].token_ids))
    assert all(-1 not in tokens for tokens in seen), "a token still on the device leaked into an output"
    assert [len(tokens) for tokens in seen] == list(range(1, 13))


def test_prefix_blocks_are_found_by_the_next_step(model_folder):
    """A request arriving one step after another with the same prompt reuses its blocks, as
    with plain steps: blocks are indexed when their step is queued, not when tokens arrive."""
    prompt = prompts(2)[0]["prompt_token_ids"] * 3  # long enough for several full blocks
    cached = {}
    for async_scheduling in (False, True):
        llm = make_llm(model_folder, async_scheduling=async_scheduling)
        engine = llm.llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=8)
        engine.add_request("first", {"prompt_token_ids": prompt}, params)
        engine.step()
        engine.add_request("second", {"prompt_token_ids": prompt}, params)
        outputs = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs[output.request_id] = output
        cached[async_scheduling] = outputs["second"].num_cached_tokens
        assert outputs["second"].outputs[0].token_ids == outputs["first"].outputs[0].token_ids
        assert engine.core._in_flight is None and engine.core.kv_cache.pool.num_used_blocks == 0
    assert cached[True] == cached[False] > 0


def test_pending_counts_return_to_zero_after_a_stop(model_folder):
    llm = make_llm(model_folder, async_scheduling=True)
    greedy = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    engine = llm.llm_engine
    seqs = []
    original = engine.core.runner.launch

    def spy(batch, tables, previous=None):
        seqs.extend(batch.seqs)
        return original(batch, tables, previous)

    engine.core.runner.launch = spy
    stops = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[o.outputs[0].token_ids[4]])
             for o in greedy]
    outputs = llm.generate(prompts(), stops, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs)
    assert engine.core._in_flight is None, "an idle engine keeps no step in flight"
    assert {seq.num_pending_tokens for seq in seqs} == {0}
    assert all(seq.num_tokens == len(seq.token_ids) for seq in seqs)


@pytest.mark.parametrize("blocks,budget", [(None, 32), (24, 16)], ids=["roomy", "preempting"])
def test_parallel_samples_fork_with_a_step_in_flight(model_folder, blocks, budget):
    """n > 1 and best_of: siblings fork from the parent once its first token is sampled, while
    the parent's next step is already queued (and may have taken a fresh block). Prompt
    lengths on and off block boundaries. The small pool forces preemption, including of
    parents whose first token is still in flight (their siblings then queue behind them)."""
    rng = random.Random(5)
    lengths = (8, 9, 12, 15, 16, 20, 31)
    batch = [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(length)]} for length in lengths]
    params = [SamplingParams(temperature=0.8, seed=11 + i, n=3, max_tokens=14) for i in range(len(lengths) - 1)]
    params.append(SamplingParams(temperature=0.8, seed=3, n=2, best_of=3, max_tokens=10))
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(model_folder, async_scheduling=async_scheduling, num_gpu_blocks_override=blocks,
                       max_num_batched_tokens=budget)
        results[async_scheduling] = llm.generate(batch, params, use_tqdm=False)
        engine = llm.llm_engine
        assert engine.core.kv_cache.pool.num_used_blocks == 0
        if blocks is not None:
            assert engine.core.scheduler.num_preemptions > 0, "the small pool was meant to force preemption"
    assert summary(results[True]) == summary(results[False])
    assert [len(o.outputs) for o in results[True]] == [3] * (len(lengths) - 1) + [2]


def test_a_child_never_writes_into_an_indexed_block(model_folder):
    """The parent of an n=2 request fills its last prompt block with its first token while
    the step that forks the child is in flight; a long prompt admitted in between starves the
    child, and the parent finishes and indexes that block. The child's first write must copy
    the block, not change what the prefix index holds: a later prompt that extends the
    parent's output must find the parent's K/V there."""
    prompt = [10, 20, 30, 40, 50, 60, 70]  # 7 tokens: the block of positions 4..7 is partly filled
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = {}
    llm = make_llm(model_folder, async_scheduling=True, max_num_batched_tokens=16)
    engine = llm.llm_engine
    engine.add_request("parent", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=3, ignore_eos=True))
    step = 0
    while engine.has_unfinished_requests():
        if step == 1:
            engine.add_request("long", {"prompt_token_ids": list(range(100, 160))},
                               SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        for output in engine.step():
            outputs[output.request_id] = output
        step += 1
    follow_up = {"prompt_token_ids": prompt + [outputs["parent"].outputs[0].token_ids[0], 5, 6]}
    hit = llm.generate([follow_up], greedy, use_tqdm=False)[0]
    assert hit.num_cached_tokens >= 8, "the follow-up was meant to reuse the parent's blocks"
    reference = make_llm(model_folder, async_scheduling=False, enable_prefix_caching=False)
    assert hit.outputs[0].token_ids == reference.generate([follow_up], greedy, use_tqdm=False)[0].outputs[0].token_ids


def test_penalties_count_the_token_in_flight_beside_forking_requests(model_folder):
    """Rows of a step where another request draws its siblings' first tokens still see their
    own newest token (still on the device) in the penalty counts."""
    results = {}
    for async_scheduling in (False, True):
        engine = make_llm(model_folder, async_scheduling=async_scheduling).llm_engine
        engine.add_request("penalised", {"prompt_token_ids": [5, 6, 7, 8, 9]},
                           SamplingParams(temperature=0.0, max_tokens=20, presence_penalty=-1.0,
                                          frequency_penalty=-0.5))
        finished, step = {}, 0
        while engine.has_unfinished_requests():
            if step in (3, 5, 7, 9, 11):
                engine.add_request(f"n2-{step}", {"prompt_token_ids": [11, 12, 13]},
                                   SamplingParams(temperature=0.7, seed=step, n=2, max_tokens=4))
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = [c.token_ids for c in output.outputs]
            step += 1
        results[async_scheduling] = finished
    assert results[True] == results[False]
