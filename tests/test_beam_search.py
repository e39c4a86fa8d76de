"""Beam search: transformers' ``num_beams`` results (with and without EOS, under length penalties),
greedy at width 1, and KV blocks shared between beams without inflating the prefix-cache stats."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch

from octavo import LLM, BeamSearchParams, SamplingParams
from octavo.beam_search import beam_score
from tests.conftest import VOCAB_SIZE

PROMPT = [random.Random(5).randrange(3, VOCAB_SIZE) for _ in range(30)]  # 30 % 4 != 0: a partial last block
PROMPTS = [PROMPT[:9], PROMPT[:17], PROMPT[3:30]]
# A token the tiny llama ranks near the top at many steps of these prompts, so as EOS it ends
# beams at varied lengths and some, not all, returned beams end in it.
LLAMA_EOS = 190


def make_llm(folder, **overrides) -> LLM:
    kwargs = dict(device="cpu", dtype="float32", max_model_len=128, block_size=4)
    kwargs.update(overrides)
    return LLM(str(folder), **kwargs)


def copy_with_eos(folder: Path, destination: Path, eos: int) -> Path:
    """The same weights, with ``eos`` as the model's only EOS id."""
    shutil.copytree(folder, destination)
    for name in ("config.json", "generation_config.json"):
        path = destination / name
        if path.exists():
            config = json.loads(path.read_text())
            config["eos_token_id"] = eos
            path.write_text(json.dumps(config))
    return destination


def transformers_beams(model, prompt: list[int], width: int, max_tokens: int, eos: Optional[int],
                       length_penalty: float) -> tuple[list[list[int]], list[float]]:
    """transformers' beams (generated ids, cut after the first EOS) and their scores, best first."""
    from transformers import GenerationConfig

    config = GenerationConfig(num_beams=width, num_return_sequences=width, max_new_tokens=max_tokens,
                              do_sample=False, early_stopping=False, length_penalty=length_penalty,
                              eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
                              output_scores=True, output_logits=True)
    # An unset eos_token_id would be filled in from the model's own generation config.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            result = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.generation_config.eos_token_id = saved
    beams = []
    for row in result.sequences[:, len(prompt):].tolist():
        beams.append(row[: row.index(eos) + 1] if eos in row else row)
    if width > 1:
        return beams, result.sequences_scores.tolist()
    # num_beams=1 is greedy search, which reports no sequence score: score it the same way.
    logprobs = [torch.log_softmax(step[0].float(), dim=-1)[token].item()
                for step, token in zip(result.logits, beams[0])]
    return beams, [sum(logprobs) / len(beams[0]) ** length_penalty]


def assert_matches_transformers(llm: LLM, model, width: int, max_tokens: int, eos: Optional[int],
                                length_penalty: float) -> int:
    """Same beams in the same order, same scores; returns how many returned beams end in EOS."""
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], BeamSearchParams(
        beam_width=width, max_tokens=max_tokens, ignore_eos=eos is None, length_penalty=length_penalty))
    num_ended = 0
    for prompt, output in zip(PROMPTS, outputs):
        expected, expected_scores = transformers_beams(model, prompt, width, max_tokens, eos, length_penalty)
        assert [beam.output_tokens for beam in output.sequences] == expected
        scores = [beam_score(beam, length_penalty) for beam in output.sequences]
        assert scores == pytest.approx(expected_scores, rel=1e-6, abs=2e-5)
        for beam in output.sequences:
            assert beam.cum_logprob == pytest.approx(sum(beam.logprobs), abs=1e-9)
            assert beam.finish_reason == ("stop" if beam.output_tokens[-1] == eos else "length")
        num_ended += sum(beam.output_tokens[-1] == eos for beam in output.sequences)
    return num_ended


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llama_with_eos(llama, tmp_path_factory):
    folder, model = llama
    return make_llm(copy_with_eos(folder, tmp_path_factory.mktemp("beam") / "llama-eos", LLAMA_EOS)), model


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_beam_search_with_eos_matches_transformers(llama_with_eos, width, length_penalty):
    llm, model = llama_with_eos
    assert llm.llm_engine.eos_token_ids == {LLAMA_EOS}
    num_ended = assert_matches_transformers(llm, model, width, 8, LLAMA_EOS, length_penalty)
    if length_penalty < 2:  # a penalty of 2 favours long beams enough that none ends early here
        assert num_ended > 0  # EOS really was generated and kept


@pytest.mark.parametrize("arch, width", [("llama", 2), ("qwen3", 3), ("gpt2", 4)])
@pytest.mark.parametrize("with_eos", [False, True])
def test_beam_search_matches_transformers_across_architectures(tiny_model_factory, tmp_path, arch, width, with_eos):
    folder, model = tiny_model_factory(arch)
    eos = None
    if with_eos:
        # The second token greedy decoding emits for the first prompt: surely generated.
        greedy = make_llm(folder).generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(
            temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
        eos = greedy[1]
        folder = copy_with_eos(folder, tmp_path / arch, eos)
    # Length penalty 0 ranks by plain cumulative logprob, so beams that end early are kept.
    num_ended = assert_matches_transformers(make_llm(folder), model, width, 6, eos, 0.0 if with_eos else 1.0)
    assert (num_ended > 0) == with_eos


def test_beam_width_one_equals_greedy(llama):
    llm = make_llm(llama[0])
    greedy = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=8,
                                                                      ignore_eos=True), use_tqdm=False)[0]
    beams = llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(beam_width=1, max_tokens=8,
                                                                            ignore_eos=True))[0]
    assert beams.sequences[0].output_tokens == greedy.outputs[0].token_ids
    assert beams.sequences[0].tokens[: len(PROMPT)] == PROMPT


def run_tracking_peak(llm: LLM, params: BeamSearchParams):
    """Beam search while recording the peak number of used KV blocks and the prefill tokens run."""
    engine = llm.llm_engine
    peak, original = 0, engine.core.runner.launch
    computed_before = engine.core.num_prefill_tokens_computed

    def spy(batch, tables, previous=None):
        nonlocal peak
        peak = max(peak, engine.core.kv_cache.pool.num_used_blocks)
        return original(batch, tables, previous)

    engine.core.runner.launch = spy
    try:
        output = llm.beam_search([{"prompt_token_ids": PROMPT}], params)[0]
    finally:
        engine.core.runner.launch = original
    return output, peak, engine.core.num_prefill_tokens_computed - computed_before


def test_beam_search_shares_blocks_and_keeps_prefix_stats_honest(llama):
    width, max_tokens, block_size = 4, 6, 4
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
    shared_llm = make_llm(llama[0], block_size=block_size)
    shared, shared_peak, shared_computed = run_tracking_peak(shared_llm, params)
    alone, alone_peak, alone_computed = run_tracking_peak(
        make_llm(llama[0], block_size=block_size, enable_prefix_caching=False), params)
    assert [b.output_tokens for b in shared.sequences] == [b.output_tokens for b in alone.sequences]
    # Unshared, every round recomputes every beam in full; shared, a beam recomputes at most its
    # partly filled last block plus the new token.
    assert alone_computed == len(PROMPT) + sum(width * (len(PROMPT) + step) for step in range(1, max_tokens))
    assert shared_computed <= len(PROMPT) + (max_tokens - 1) * width * block_size
    assert shared_peak < alone_peak
    stats = shared_llm.llm_engine.kv_cache_stats()
    assert stats.num_used_blocks == 0  # every dropped or finished beam released its blocks
    # Only the prompt's own look-up counts, as for generate; the beams' reuse does not.
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (len(PROMPT), 0)
    run_tracking_peak(shared_llm, params)
    stats = shared_llm.llm_engine.kv_cache_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (2 * len(PROMPT), 28)  # 7 full blocks


def test_salted_beam_search_sees_only_its_salt(llama):
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    llm = make_llm(llama[0], block_size=4)
    unsalted = llm.beam_search([{"prompt_token_ids": PROMPT}], params)[0]
    hits = llm.llm_engine.kv_cache_stats().prefix_cache_hits
    salted = llm.beam_search([{"prompt_token_ids": PROMPT, "cache_salt": "tenant-a"}], params)[0]
    assert llm.llm_engine.kv_cache_stats().prefix_cache_hits == hits  # the unsalted blocks stayed invisible
    assert [b.output_tokens for b in salted.sequences] == [b.output_tokens for b in unsalted.sequences]
    llm.beam_search([{"prompt_token_ids": PROMPT, "cache_salt": "tenant-a"}], params)
    assert llm.llm_engine.kv_cache_stats().prefix_cache_hits > hits  # its own salt's blocks are found


def test_temperature_only_adds_sampled_candidates_scored_by_raw_logprobs(llama):
    """As in vLLM: the temperature draws each beam's sampled token, but every candidate is scored
    by the untempered model, so cum_logprob is the sequence's plain log-likelihood."""
    folder, model = llama
    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True, temperature=1.5)
    output = make_llm(folder).beam_search([{"prompt_token_ids": PROMPT}], params)[0]
    assert len(output.sequences) == 2
    for beam in output.sequences:
        with torch.no_grad():
            logits = model(torch.tensor([beam.tokens])).logits[0].float()
        targets = torch.tensor(beam.output_tokens)
        raw = torch.log_softmax(logits[len(PROMPT) - 1 : -1], dim=-1).gather(1, targets[:, None]).sum().item()
        assert beam.cum_logprob == pytest.approx(raw, abs=2e-5)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=float("nan"))
