"""Sampler: per-request parameters, seeded reproducibility, filters, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from octavo.sampling_params import SamplingParams
from octavo.worker.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
    make_generator,
)

CPU = torch.device("cpu")
EOS = 0


def row(
    params: SamplingParams,
    output: list[int] | None = None,
    prompt: list[int] | None = None,
    eos: frozenset[int] = frozenset({EOS}),
) -> SamplingRow:
    generator = make_generator(params.seed, CPU) if params.seed is not None else None
    prompt = prompt or [1, 2, 3]
    return SamplingRow(params, prompt + (output or []), len(prompt), generator, eos)


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in logits]


# A hand-made distribution: token i has probability PROBS[i].
PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]
HAND_LOGITS = torch.tensor(PROBS).log()


def test_greedy_is_argmax_any_dtype() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 300)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = Sampler()(logits.to(dtype), [row(SamplingParams(temperature=0.0)) for _ in range(8)])
        assert out.sampled_token_ids == logits.to(dtype).float().argmax(-1).tolist()
        assert out.top_logprobs == [None] * 8


def test_seeded_sampling_independent_of_batch_composition_and_position() -> None:
    torch.manual_seed(1)
    target = torch.randn(500)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def run(position: int, others: list[SamplingParams]) -> list[int]:
        generator_row = row(params)  # a fresh generator per run: same seed, same stream
        tokens = []
        for _ in range(10):
            batch = [row(p) for p in others]
            batch.insert(position, generator_row)
            logits = torch.randn(len(batch), 500)
            logits[position] = target
            tokens.append(Sampler()(logits, batch).sampled_token_ids[position])
        return tokens

    alone = run(0, [])
    assert len(set(alone)) > 1  # it really samples
    assert (
        run(2, [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=7)]) == alone
    )
    assert run(1, [SamplingParams(top_k=3), SamplingParams(min_p=0.2, seed=99)]) == alone


def test_sampling_frequencies_match_distribution() -> None:
    torch.manual_seed(2)
    n = 20000
    logits = HAND_LOGITS.repeat(n, 1)
    out = Sampler()(logits, [row(SamplingParams(temperature=1.0))] * n)
    freq = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=5).float() / n
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.015)


def test_temperature_sharpens() -> None:
    torch.manual_seed(3)
    n = 5000
    logits = HAND_LOGITS.repeat(n, 1)
    out = Sampler()(logits, [row(SamplingParams(temperature=0.5))] * n)
    freq = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=5).float() / n
    expected = torch.softmax(HAND_LOGITS / 0.5, -1)
    assert torch.allclose(freq, expected, atol=0.02)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 1}, {0}),
        ({"top_p": 0.65}, {0, 1}),
        ({"top_p": 0.8}, {0, 1, 2}),
        ({"top_p": 0.3}, {0}),
        ({"min_p": 0.5}, {0, 1}),  # keeps p >= 0.2
        ({"min_p": 0.3}, {0, 1, 2}),  # keeps p >= 0.12
        ({"top_k": 3, "top_p": 0.9}, {0, 1, 2}),  # top-p on the top-3 renormalised mass
        ({"top_k": 4, "top_p": 0.8, "min_p": 0.6}, {0, 1}),
        ({}, {0, 1, 2, 3, 4}),
    ],
)
def test_filters_limit_the_tokens_that_can_be_sampled(kwargs: dict, expected: set[int]) -> None:
    seen = set()
    for seed in range(300):
        out = Sampler()(HAND_LOGITS[None].clone(), [row(SamplingParams(seed=seed, **kwargs))])
        seen.add(out.sampled_token_ids[0])
    assert seen == expected


def test_masking_helpers_per_row() -> None:
    logits = HAND_LOGITS.repeat(4, 1)
    apply_top_k_top_p(logits, [2, 0, 0, 3], [1.0, 0.65, 1.0, 0.9])
    assert kept(logits) == [{0, 1}, {0, 1}, {0, 1, 2, 3, 4}, {0, 1, 2}]
    # Surviving logits are untouched.
    assert torch.equal(logits[2], HAND_LOGITS)

    only_k = HAND_LOGITS.repeat(3, 1)
    apply_top_k_top_p(only_k, [1, 0, 4], [1.0, 1.0, 1.0])  # the path without a full sort
    assert kept(only_k) == [{0}, {0, 1, 2, 3, 4}, {0, 1, 2, 3}]

    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    apply_top_k_top_p(ties, [1], [1.0])  # ties with the k-th value survive
    assert kept(ties) == [{1, 2}]

    min_p = HAND_LOGITS.repeat(3, 1)
    apply_min_p(min_p, [0.0, 0.5, 1.0])
    assert kept(min_p) == [{0, 1, 2, 3, 4}, {0, 1}, {0}]


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=40),
    top_p=st.floats(0.01, 1.0),
    top_k=st.integers(0, 45),
)
def test_top_k_top_p_mask_properties(logits: list[float], top_p: float, top_k: int) -> None:
    x = torch.tensor([logits])
    masked = apply_top_k_top_p(x.clone(), [top_k], [top_p])[0]
    keep = torch.isfinite(masked)
    assert keep.any()
    assert torch.equal(masked[keep], x[0][keep])
    # Everything kept is at least as likely as anything dropped.
    if (~keep).any():
        assert x[0][keep].min() >= x[0][~keep].max()
    # Top-k never keeps fewer than k tokens, nor more than the ties with the k-th allow.
    if 0 < top_k < len(logits) and top_p >= 1.0:
        kth = x[0].topk(top_k).values[-1]
        assert keep.sum() == (x[0] >= kth).sum()
    # Top-p over the top-k distribution: the kept mass reaches top_p, and is minimal.
    base = (
        x[0]
        if not 0 < top_k < len(logits)
        else x[0].masked_fill(x[0] < x[0].topk(top_k).values[-1], -math.inf)
    )
    probs = base.softmax(-1)
    kept_probs = probs[keep]
    assert kept_probs.sum() >= min(top_p, 1.0) - 1e-5
    assert kept_probs.sum() - kept_probs.min() < top_p + 1e-5


def test_penalties_hand_computed() -> None:
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, -0.5, 1.0],
            [2.0, -1.0, 0.5, -0.5, 1.0],
            [2.0, -1.0, 0.5, -0.5, 1.0],
        ]
    )
    apply_penalties(
        logits,
        prompt_token_ids=[[0], [0], [0, 3]],
        output_token_ids=[[1, 2, 2], [1, 2, 2], [2, 4, 4, 4]],
        repetition_penalties=[2.0, 1.0, 1.0],
        presence_penalties=[0.5, 0.0, 0.5],
        frequency_penalties=[0.25, 0.0, -0.5],
    )
    expected = torch.tensor(
        [
            # 0: prompt only, positive -> /2; 1: output x1, negative -> *2, -0.25-0.5;
            # 2: output x2, positive -> /2, -0.5-0.5; 3, 4: unseen.
            [1.0, -2.75, -0.75, -0.5, 1.0],
            [2.0, -1.0, 0.5, -0.5, 1.0],  # neutral penalties
            # output counts only (prompt token 3 untouched): 2 -= 0.5 - 0.5 * 1, 4 -= 0.5 - 0.5 * 3
            [2.0, -1.0, 0.5, -0.5, 2.0],
        ]
    )
    assert torch.allclose(logits, expected)


def test_penalties_steer_greedy_and_leave_logprobs_raw() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    out = Sampler()(
        logits,
        [
            row(
                SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=2),
                output=[0],
                prompt=[2],
            )
        ],
    )
    assert out.sampled_token_ids == [1]
    raw = torch.log_softmax(logits, -1)[0]
    assert out.sampled_logprobs[0] == pytest.approx(raw[1].item(), abs=1e-6)
    assert out.top_logprobs[0] == {
        0: pytest.approx((raw[0].item(), 1)),
        1: pytest.approx((raw[1].item(), 2)),
    }
    assert torch.equal(logits, torch.tensor([[3.0, 2.5, 0.0, -1.0]]))  # the input is not modified


def test_min_tokens_blocks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0]]).repeat(4, 1)  # 0 = EOS, 1 = a stop token
    base = {"temperature": 0.0, "min_tokens": 3, "stop_token_ids": [1]}
    rows = [
        row(SamplingParams(**base), output=[4]),
        row(SamplingParams(**base, ignore_eos=True), output=[4]),  # EOS allowed, stop tokens not
        row(SamplingParams(**base), output=[4, 4, 4]),  # min_tokens reached
        row(SamplingParams(**{**base, "temperature": 1.0, "seed": 5}), output=[]),
    ]
    assert Sampler()(logits, rows).sampled_token_ids[:3] == [2, 0, 0]
    for seed in range(50):
        rows[3] = row(SamplingParams(**{**base, "temperature": 1.0, "seed": seed}))
        assert Sampler()(logits, rows).sampled_token_ids[3] not in (0, 1)


def test_logprobs_include_sampled_token_with_rank() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 50) * 3
    raw = torch.log_softmax(logits, -1)
    order = raw.argsort(dim=-1, descending=True)
    # Row 0 cannot emit its favourite (EOS), so it samples the second best: not in the top-1.
    eos = order[0, 0].item()
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=1, min_tokens=1), eos=frozenset({eos})),
        row(SamplingParams(temperature=1.2, logprobs=5, seed=3)),
        row(SamplingParams(temperature=0.7, logprobs=0, seed=4)),
    ]
    out = Sampler()(logits, rows)
    assert out.sampled_token_ids[0] == order[0, 1].item()
    for i, (token, table) in enumerate(zip(out.sampled_token_ids, out.top_logprobs)):
        assert out.sampled_logprobs[i] == pytest.approx(raw[i, token].item(), abs=1e-5)
        assert token in table
        top = order[i, : rows[i].params.logprobs].tolist()
        assert set(table) == set(top) | {token}
        for tid, (value, rank) in table.items():
            assert value == pytest.approx(raw[i, tid].item(), abs=1e-5)
            assert rank == (raw[i] > raw[i, tid]).sum().item() + 1
    assert out.top_logprobs[0][order[0, 1].item()][1] == 2
    assert len(out.top_logprobs[2]) == 1


def test_prompt_logprobs() -> None:
    torch.manual_seed(5)
    logits = torch.randn(6, 40)
    targets = torch.tensor([3, 7, 0, 39, 12, 5])
    raw = torch.log_softmax(logits, -1)
    result = compute_prompt_logprobs(logits.to(torch.bfloat16).float(), targets, 3)
    raw = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert len(result) == 6
    for i, table in enumerate(result):
        top = raw[i].topk(3).indices.tolist()
        assert set(table) == set(top) | {targets[i].item()}
        for tid, (value, rank) in table.items():
            assert value == pytest.approx(raw[i, tid].item(), abs=1e-5)
            assert rank == (raw[i] > raw[i, tid]).sum().item() + 1
    only_target = compute_prompt_logprobs(logits, targets, 0)
    assert [list(t) for t in only_target] == [[t] for t in targets.tolist()]


def test_mixed_batch() -> None:
    torch.manual_seed(6)
    logits = torch.randn(6, 200)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=2),
        SamplingParams(temperature=0.6, top_k=5, top_p=0.9, seed=12),
        SamplingParams(temperature=1.3, min_p=0.1, frequency_penalty=0.5),
    ]
    rows = [row(p, output=[int(logits[i].argmax())]) for i, p in enumerate(params)]
    before = logits.clone()
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)
    assert out.sampled_token_ids[0] == logits[0].argmax().item()
    penalized = logits[3].clone()
    penalized[int(logits[3].argmax())] -= 1.0
    assert out.sampled_token_ids[3] == penalized.argmax().item()
    for i in (1, 4):  # seeded rows sample as they would alone
        alone = Sampler()(logits[i : i + 1], [row(params[i], output=rows[i].output_token_ids)])
        assert alone.sampled_token_ids[0] == out.sampled_token_ids[i]
    assert out.sampled_token_ids[4] in logits[4].topk(5).indices.tolist()
    assert [t is None for t in out.top_logprobs] == [True, True, True, False, True, True]
    assert all(isinstance(t, int) for t in out.sampled_token_ids)
    assert all(isinstance(v, float) for v in out.sampled_logprobs)


def test_empty_batch() -> None:
    out = Sampler()(torch.empty(0, 10), [])
    assert out.sampled_token_ids == [] and out.sampled_logprobs == [] and out.top_logprobs == []


@pytest.mark.parametrize("kwargs", [
    dict(min_tokens=2), dict(n=1, best_of=2), dict(logprobs=0), dict(repetition_penalty=1.2),
    dict(presence_penalty=0.5), dict(frequency_penalty=0.5), dict(logit_bias={3: 5.0}),
    dict(allowed_token_ids=[3, 4]), dict(bad_words=["x"]), dict(logits_processors=[lambda ids, logits: logits]),
    dict(watermark=True), dict(temperature=0.7),
], ids=lambda kwargs: next(iter(kwargs)))
def test_every_other_control_keeps_greedy_rows_off_the_argmax_paths(kwargs: dict) -> None:
    """The argmax paths (plain, and masked by a grammar) skip every per-row stage: any stage a
    row asks for sends it to the full sampler."""
    from octavo.worker.sampler import is_masked_greedy, is_plain_greedy

    params = SamplingParams(**{"temperature": 0.0, **kwargs})
    assert not is_masked_greedy(params) and not is_plain_greedy(params)
    grammar = SamplingParams(**{"temperature": 0.0, **kwargs}, structured_outputs={"regex": "a+"}) \
        if "min_tokens" not in kwargs else None  # min_tokens with a grammar is refused outright
    if grammar is not None:
        assert not is_masked_greedy(grammar)


def test_the_argmax_paths_take_plain_and_grammar_greedy_rows() -> None:
    from octavo.worker.sampler import is_masked_greedy, is_plain_greedy

    assert is_plain_greedy(SamplingParams(temperature=0.0)) and is_masked_greedy(SamplingParams(temperature=0.0))
    grammar = SamplingParams(temperature=0.0, structured_outputs={"regex": "a+"})
    assert is_masked_greedy(grammar) and not is_plain_greedy(grammar)
