"""logit_bias, allowed_token_ids, bad_words and logits processors: in the sampler on their own,
through ``LLM.generate`` (with pipelined steps) and through the server."""

from __future__ import annotations

import math
import os

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.worker.sampler import Sampler, SamplingRow
from tests.structured_fixtures import build_structured_model
from tests.test_server import MODEL, start_server

VOCAB = 40
DEVICE = os.environ.get("OCTAVO_TEST_DEVICE", "cpu")


def row(params: SamplingParams, output=()) -> SamplingRow:
    return SamplingRow(params, [1, 2] + list(output), 2, None, frozenset({2}))


def sample(rows, logits=None):
    if logits is None:
        logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(0))
    return Sampler()(logits, rows).sampled_token_ids


def test_sampler_controls_each_row_on_its_own():
    logits = torch.zeros(5, VOCAB)
    logits[:, 7] = 5.0  # every row's argmax, unless a control moves it
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=0.0, logit_bias={11: 10.0})),
        row(SamplingParams(temperature=0.0, logit_bias={7: -100})),
        row(SamplingParams(temperature=0.0, allowed_token_ids=[3, 9])),
        row(SamplingParams(temperature=0.0, logits_processors=[lambda out, lg: lg.index_fill_(0, torch.tensor([7]), -math.inf)])),
    ]
    tokens = sample(rows, logits.clone())
    assert tokens[0] == 7 and tokens[1] == 11 and tokens[2] != 7 and tokens[3] in (3, 9) and tokens[4] != 7


def test_allowed_token_ids_hold_under_random_sampling():
    params = SamplingParams(temperature=1.5, allowed_token_ids=[4, 20, 33])
    for seed in range(5):
        rows = [row(params) for _ in range(8)]
        logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(seed))
        assert set(sample(rows, logits)) <= {4, 20, 33}


def test_bad_words_block_single_and_multi_token_words():
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 5.0
    single = SamplingParams(temperature=0.0, bad_words=["x"])
    single.bad_words_token_ids = [[7]]
    multi = SamplingParams(temperature=0.0, bad_words=["xy"])
    multi.bad_words_token_ids = [[5, 6, 7]]
    rows = [row(single), row(multi, output=[9, 5, 6]), row(multi, output=[5, 9])]
    tokens = sample(rows, logits)
    assert tokens[0] != 7  # always blocked
    assert tokens[1] != 7  # the output ends with the word's first tokens
    assert tokens[2] == 7  # it does not: nothing to block


def test_processor_with_prompt_sees_the_tokens():
    seen = []

    def processor(prompt, output, logits):
        seen.append((list(prompt), list(output)))
        return logits

    sample([row(SamplingParams(logits_processors=[processor]), output=[3, 4])])
    assert seen == [([1, 2], [3, 4])]


def test_bad_processor_output_is_a_value_error():
    with pytest.raises(ValueError, match="logits processor"):
        sample([row(SamplingParams(logits_processors=[lambda out, lg: lg[:3]]))])


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {1: 101}), ("logit_bias", {"a": 1}), ("logit_bias", {-1: 1}), ("allowed_token_ids", [-1]),
    ("allowed_token_ids", []), ("bad_words", [""]), ("logits_processors", [3]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controls")
    build_structured_model(folder)
    return folder


@pytest.fixture(scope="module")
def llm(model_folder):
    # Logits processors are callables: they need the engine core in this process.
    engine = LLM(str(model_folder), device=DEVICE, dtype="float32", async_scheduling=True, kv_cache_memory=8 << 20,
                 gpu_memory_utilization=0.2, engine_core_process=False)
    yield engine
    del engine


def test_generate_honours_controls_with_pipelined_steps(llm):
    tokenizer = llm.get_tokenizer()
    prompts = ["Hello", "The capital of France is"]
    plain = llm.generate(prompts, SamplingParams(max_tokens=30, seed=1, ignore_eos=True), use_tqdm=False)
    plain_tokens = {t for o in plain for t in o.outputs[0].token_ids}

    allowed = sorted(plain_tokens)[:4]
    out = llm.generate(prompts, SamplingParams(n=2, max_tokens=30, seed=1, ignore_eos=True, allowed_token_ids=allowed),
                       use_tqdm=False)
    assert {t for o in out for c in o.outputs for t in c.token_ids} <= set(allowed)

    favourite = tokenizer.convert_tokens_to_ids("Paris")
    out = llm.generate(prompts, SamplingParams(max_tokens=10, seed=1, ignore_eos=True, logit_bias={favourite: 100}),
                       use_tqdm=False)
    assert all(o.outputs[0].token_ids == [favourite] * 10 for o in out)

    # Greedy rows with a control take the full sampler, not the argmax paths.
    out = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                               logit_bias={favourite: 100}), use_tqdm=False)
    assert all(o.outputs[0].token_ids == [favourite] * 10 for o in out)
    out = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                               allowed_token_ids=allowed[:2]), use_tqdm=False)
    assert {t for o in out for t in o.outputs[0].token_ids} <= set(allowed[:2])
    out = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, watermark=True),
                       use_tqdm=False)
    plain_greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                                use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] != [o.outputs[0].token_ids for o in plain_greedy]

    # "Paris" with a greedy bias towards it would be generated at once; as a bad word it never is.
    out = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, bad_words=["Paris"],
                                               logit_bias={favourite: 100}), use_tqdm=False)
    for o in out:
        assert favourite not in o.outputs[0].token_ids and "Paris" not in o.outputs[0].text

    # A processor that counts what it sees: with pipelined steps it still sees every earlier token.
    lengths: list[int] = []

    def count(output_ids, logits):
        lengths.append(len(output_ids))
        return logits

    llm.generate(["Hello"], SamplingParams(max_tokens=12, ignore_eos=True, logits_processors=[count]), use_tqdm=False)
    assert lengths == list(range(12))


def test_out_of_vocabulary_ids_are_refused(llm):
    for field, value in [("logit_bias", {10**6: 1.0}), ("allowed_token_ids", [10**6]),
                         ("bad_words_token_ids", [[5, 10**6]])]:
        with pytest.raises(ValueError, match=field.removesuffix("_token_ids")):
            llm.generate(["Hello"], SamplingParams(**{field: value}), use_tqdm=False)
    with pytest.raises(ValueError, match="bad_words_token_ids"):
        SamplingParams(bad_words_token_ids=[[]])


def test_bad_words_become_token_ids_in_the_front_end(llm, monkeypatch):
    """The front end turns the words into ids once; the core, which has no tokenizer, gets the ids."""
    sent = []
    core = llm.llm_engine.core
    original = core.add_request
    monkeypatch.setattr(core, "add_request", lambda request: sent.append(request) or original(request))
    llm.generate(["Hello"], SamplingParams(max_tokens=4, bad_words=["Paris"]), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    expected = [tokenizer.encode(text, add_special_tokens=False) for text in ("Paris", " Paris")]
    assert sent[0].sampling["bad_words_token_ids"] == expected


def test_logits_processors_need_the_core_in_this_process(model_folder):
    llm = LLM(str(model_folder), device=DEVICE, dtype="float32", kv_cache_memory=8 << 20, gpu_memory_utilization=0.2,
              engine_core_process=True)
    try:
        with pytest.raises(ValueError, match="engine_core_process=False"):
            llm.generate(["Hello"], SamplingParams(logits_processors=[lambda out, logits: logits]), use_tqdm=False)
        # The engine goes on: everything but the callables reaches the other process.
        favourite = llm.get_tokenizer().convert_tokens_to_ids("Paris")
        out = llm.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True, logit_bias={favourite: 100}),
                           use_tqdm=False)
        assert out[0].outputs[0].token_ids == [favourite] * 3
    finally:
        llm.shutdown()


def test_server_logit_bias_allowed_bad_words(model_folder):
    server = start_server(model_folder)
    try:
        client = server.client()
        favourite = server.tokenizer.convert_tokens_to_ids("Paris")
        response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, seed=1,
                                             logit_bias={str(favourite): 100}, extra_body={"ignore_eos": True})
        assert response.choices[0].text == "Paris" * 5
        response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, seed=1,
                                             extra_body={"allowed_token_ids": [favourite], "ignore_eos": True})
        assert response.choices[0].text == "Paris" * 8
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
            logit_bias={str(favourite): 100}, extra_body={"bad_words": ["Paris"], "ignore_eos": True})
        assert "Paris" not in response.choices[0].message.content
        import openai

        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, logit_bias={"1": 500})
    finally:
        server.stop()


def test_readme_logits_processor_example(llm):
    class NoRepeatLastToken:  # as in the README
        def __call__(self, output_token_ids, logits):
            if output_token_ids:
                logits[output_token_ids[-1]] = float("-inf")
            return logits

    out = llm.generate(["Hello"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                 logits_processors=[NoRepeatLastToken()]), use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == 40 and all(a != b for a, b in zip(tokens, tokens[1:]))
    plain = llm.generate(["Hello"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), use_tqdm=False)
    plain_tokens = plain[0].outputs[0].token_ids
    assert any(a == b for a, b in zip(plain_tokens, plain_tokens[1:]))  # greedy alone does repeat
