"""Steady decode steps build their inputs by diffs from the step before (model_runner's
``_SteadyBatch``); every such step must equal what the full preparation builds, and the tokens
must equal those of an engine that never takes the steady path."""

from __future__ import annotations

import random

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.worker.model_runner import ModelRunner


def _make_llm(folder, async_scheduling: bool) -> LLM:
    return LLM(str(folder), dtype="float32", device="cpu", max_model_len=96, block_size=4, max_num_seqs=8,
               async_scheduling=async_scheduling, engine_core_process=False)


def _prompts() -> list[dict]:
    rng = random.Random(3)
    return [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(rng.randint(2, 30))]} for _ in range(6)]


# Greedy (the plain sampler path), penalties and seeded sampling (the full sampler on steady inputs),
# stop tokens and different lengths (the batch changes as samples finish).
_PARAMS = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
           SamplingParams(temperature=0.0, max_tokens=17, repetition_penalty=1.3, ignore_eos=True),
           SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=20, ignore_eos=True),
           SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[7, 11])]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("params", _PARAMS)
def test_steady_inputs_equal_full_preparation(tiny_model_factory, monkeypatch, async_scheduling, params):
    folder, _ = tiny_model_factory("llama")
    llm = _make_llm(folder, async_scheduling)
    steady_inputs = ModelRunner._steady_inputs
    checked = []

    def checking(self, batch, block_tables, previous):
        inputs = steady_inputs(self, batch, block_tables, previous)
        if inputs is not None:
            full = ModelRunner.prepare_inputs(self, batch, list(block_tables), previous)
            for name in ("seq_lens", "query_start_loc", "slot_mapping"):
                assert torch.equal(getattr(inputs.metadata, name), getattr(full.metadata, name)), name
            width = full.metadata.block_tables.shape[1]
            assert torch.equal(inputs.metadata.block_tables[:, :width], full.metadata.block_tables)
            assert not inputs.metadata.block_tables[:, width:].any()
            assert torch.equal(inputs.positions, full.positions)
            assert torch.equal(inputs.input_ids, full.input_ids)
            assert torch.equal(inputs.sample_indices, full.sample_indices)
            assert inputs.sample_seqs == full.sample_seqs
            checked.append(len(batch.seqs))
        return inputs

    monkeypatch.setattr(ModelRunner, "_steady_inputs", checking)
    outputs = llm.generate(_prompts(), params)
    assert len(checked) > 10  # the steady path really ran
    monkeypatch.setattr(ModelRunner, "_steady_inputs", lambda self, batch, tables, previous: None)
    reference = _make_llm(folder, async_scheduling).generate(_prompts(), params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert [o.outputs[0].finish_reason for o in outputs] == [o.outputs[0].finish_reason for o in reference]
