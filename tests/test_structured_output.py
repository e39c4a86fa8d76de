"""Structured output offline: every constrained output parses and matches its schema, regex,
choice or grammar, with n > 1 (each sample its own matcher) and with the pipelined scheduler
(constrained rows sample only after the step in flight has been processed)."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

from octavo import LLM, SamplingParams
from octavo.structured_output import StructuredOutputsParams
from tests.structured_fixtures import build_structured_model

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{0,7}$"},
        "note": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "note", "age", "color", "tags"],
    "additionalProperties": False,
}
# OCTAVO_TEST_DEVICE=cuda runs the same checks on a GPU (the Triton mask kernel, overlapped steps).
DEVICE = os.environ.get("OCTAVO_TEST_DEVICE", "cpu")
PROMPTS = ["Hello", "The capital of France is", "What is the weather like?"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured")
    build_structured_model(folder)
    return folder


@pytest.fixture(scope="module", params=[(False, False), (True, False), (True, True)],
                ids=["sync", "async", "core-process"])
def llm(request, model_folder):
    async_scheduling, engine_core_process = request.param
    engine = LLM(str(model_folder), device=DEVICE, dtype="float32", async_scheduling=async_scheduling,
                 engine_core_process=engine_core_process, kv_cache_memory=8 << 20, gpu_memory_utilization=0.2)
    yield engine
    engine.shutdown()


def texts(outputs) -> list[str]:
    for output in outputs:
        for completion in output.outputs:
            assert completion.finish_reason == "stop", completion
    return [completion.text for output in outputs for completion in output.outputs]


def parse_json(text: str):
    # strict=False: xgrammar (0.2.9) lets length-limited strings ("note") hold raw control
    # characters, which strict JSON forbids; the other string kinds exclude them.
    return json.loads(text, strict=False)


def test_json_schema_n_samples(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    results = texts(llm.generate(PROMPTS, params, use_tqdm=False))
    assert len(results) == 9
    for text in results:
        jsonschema.validate(parse_json(text), PERSON)
    # The samples drew their own tokens (distinct matchers), not copies of one another.
    assert len(set(results)) > 3


def test_json_schema_compact_greedy(llm):
    params = SamplingParams(temperature=0.0, max_tokens=200,
                            structured_outputs={"json": json.dumps(PERSON), "disable_any_whitespace": True})
    for text in texts(llm.generate(PROMPTS, params, use_tqdm=False)):
        jsonschema.validate(parse_json(text), PERSON)
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert not re.search(r"[\n\r\t]|\s\s", outside_strings)  # one line, single-space separators
        assert list(parse_json(text)) == list(PERSON["properties"])  # in the schema's order


def test_regex_choice_grammar(llm):
    regex = r"[a-z]{2,6}@(octavo|example)\.(org|com)"
    outputs = llm.generate(PROMPTS, SamplingParams(n=2, seed=2, max_tokens=40, structured_outputs={"regex": regex}),
                           use_tqdm=False)
    assert all(re.fullmatch(regex, text) for text in texts(outputs))

    choices = ["yes", "no", "maybe so"]
    outputs = llm.generate(PROMPTS, SamplingParams(n=4, seed=3, max_tokens=10, structured_outputs={"choice": choices}),
                           use_tqdm=False)
    assert set(texts(outputs)) <= set(choices)

    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    outputs = llm.generate(PROMPTS, SamplingParams(seed=4, max_tokens=60, structured_outputs={"grammar": grammar}),
                           use_tqdm=False)
    assert all(re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text) for text in texts(outputs))


def test_json_object(llm):
    # Any JSON object: a random model has no reason to ever close a string, as a trained one has,
    # so a bias towards the closing tokens stands in for that (logit_bias under a grammar).
    tokenizer = llm.get_tokenizer()
    closing = {tokenizer.convert_tokens_to_ids(token): 6.0 for token in ('"', "}")}
    params = SamplingParams(seed=5, max_tokens=300, logit_bias=closing,
                            structured_outputs={"json_object": True, "disable_any_whitespace": True})
    for text in texts(llm.generate(PROMPTS, params, use_tqdm=False)):
        assert isinstance(parse_json(text), dict)


def test_mixed_batch_keeps_unconstrained_rows_unchanged(llm):
    """A constrained request beside plain ones changes nothing for them (greedy, compared alone)."""
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    constrained = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs={"choice": ["red", "blue"]})
    mixed = llm.generate(PROMPTS + ["Hello"], [plain] * 3 + [constrained], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert mixed[3].outputs[0].text in ("red", "blue")


def test_same_schema_compiles_once(llm):
    from octavo.structured_output import StructuredOutputManager

    tokenizer = llm.get_tokenizer()
    manager = StructuredOutputManager(lambda: tokenizer, len(tokenizer) + 12, [tokenizer.eos_token_id])
    first = manager.grammar_for(StructuredOutputsParams(json=PERSON))
    again = manager.grammar_for(StructuredOutputsParams(json=json.dumps(PERSON, indent=2)))
    assert first._compiled is again._compiled  # keyed by the canonical schema, not its spelling
    assert first.matcher is not again.matcher  # but each sequence has its own matcher


def test_the_core_loads_its_tokenizer_with_the_first_constrained_request(model_folder, monkeypatch):
    from octavo.model_loader import loader

    llm = LLM(str(model_folder), device=DEVICE, dtype="float32", kv_cache_memory=8 << 20, gpu_memory_utilization=0.2,
              engine_core_process=False)  # to count the core's loads here
    loads = []
    original = loader.load_tokenizer
    monkeypatch.setattr(loader, "load_tokenizer", lambda *args: loads.append(args) or original(*args))
    llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
    assert loads == []  # the front end has its own; the core needs none for plain requests
    for _ in range(2):
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, structured_outputs={"choice": ["red", "blue"]}),
                               use_tqdm=False)
        assert set(texts(outputs)) <= {"red", "blue"}
    assert len(loads) == 1


def test_structured_output_needs_a_tokenizer(model_folder):
    llm = LLM(str(model_folder), device=DEVICE, dtype="float32", kv_cache_memory=8 << 20, gpu_memory_utilization=0.2,
              engine_core_process=False, skip_tokenizer_init=True)
    for name, value in (("structured_outputs", {"regex": "a+"}), ("bad_words", ["a"])):
        with pytest.raises(ValueError, match=f"{name} needs the model's tokenizer"):
            llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(**{name: value}), use_tqdm=False)


@pytest.mark.parametrize("value, message", [
    ({"regex": "a("}, "structured_outputs.regex is invalid"),
    ({"json": {"type": "no-such-type"}}, "structured_outputs.json is invalid"),
    ({"grammar": "root ::= missing"}, "structured_outputs.grammar is invalid"),
    ({"choice": []}, "structured_outputs.choice must be"),
    ({"json": {}, "regex": "a"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"jsn": {}}, "unknown keys: jsn"),
])
def test_invalid_constraints_are_value_errors(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(structured_outputs=value)


def test_ignore_eos_is_refused_with_a_grammar():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a+"})


def test_min_tokens_is_refused_with_a_grammar():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=3, structured_outputs={"choice": ["a"]})


def test_missing_xgrammar_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'octavo\[structured\]'"):
        SamplingParams(structured_outputs={"regex": "a+"})
    assert SamplingParams(logit_bias={1: 2.0}).logit_bias == {1: 2.0}  # the rest needs no grammar engine


def test_a_rejected_token_leaves_its_row_unconstrained(llm, caplog):
    """A token the grammar refuses (the mask prevents it, but a bug must not kill the engine)
    drops that row's grammar with an error; the others keep theirs."""
    from types import SimpleNamespace

    from octavo.engine.core import EngineCore
    from octavo.structured_output import StructuredOutputManager

    tokenizer = llm.get_tokenizer()
    manager = StructuredOutputManager(lambda: tokenizer, len(tokenizer) + 12, [tokenizer.eos_token_id])
    choice = StructuredOutputsParams(choice=["red", "blue"])
    red = tokenizer.encode("red", add_special_tokens=False)[0]
    comma = tokenizer.encode(",", add_special_tokens=False)[0]
    seqs = [SimpleNamespace(grammar=manager.grammar_for(choice), request_id=f"r{i}") for i in range(2)]
    with caplog.at_level("ERROR"):
        EngineCore._advance_grammar(seqs[0], red)
        EngineCore._advance_grammar(seqs[1], comma)
    assert seqs[0].grammar is not None and seqs[1].grammar is None
    assert "r1: the grammar rejected token" in caplog.text and "r0" not in caplog.text


def test_a_grammar_that_fails_to_compile_leaves_its_row_unconstrained():
    from concurrent.futures import Future
    from types import SimpleNamespace

    from octavo.structured_output import SequenceGrammar, constrained_rows

    failed: Future = Future()
    failed.set_exception(RuntimeError("compiler broke"))
    good: Future = Future()
    good.set_result(None)
    seqs = [SimpleNamespace(grammar=SequenceGrammar(failed), is_finished=False),
            SimpleNamespace(grammar=None, is_finished=False),
            SimpleNamespace(grammar=SequenceGrammar(good), is_finished=True)]
    assert constrained_rows(seqs) == ([], [])
    assert seqs[0].grammar is None


def test_params_are_plain_data():
    """What the engine core needs travels as plain data (dicts, lists, strings, numbers)."""
    import dataclasses

    params = SamplingParams(n=2, structured_outputs=StructuredOutputsParams(json=PERSON), logit_bias={3: 1.5},
                            allowed_token_ids=[3, 4], bad_words=["Paris"], watermark=True)
    plain = json.loads(json.dumps(dataclasses.asdict(params)))  # logit_bias keys become strings: accepted
    assert SamplingParams(**plain) == params


@pytest.mark.parametrize("constraint", [{"json": PERSON}, {"regex": "a+"}, {"choice": ["x", "y"]},
                                        {"grammar": 'root ::= "a"'}, {"json_object": True}])
def test_params_round_trip_through_the_core_messages(constraint):
    """CoreRequest.sampling_fields -> msgpack -> SamplingParams(**fields) in the core, nested
    StructuredOutputsParams (and the resolved bad-word ids) included."""
    from octavo.engine.messages import AddRequests, CoreRequest, decode_to_core, encode

    params = SamplingParams(n=2, seed=3, structured_outputs=StructuredOutputsParams(**constraint),
                            logit_bias={3: 1.5, 7: -2.0}, allowed_token_ids=[3, 4, 7], bad_words=["Paris"],
                            watermark=True, watermark_key=11)
    params.bad_words_token_ids = [[5], [6, 7]]
    request = CoreRequest(0, [1, 2, 3], CoreRequest.sampling_fields(params), 0.0)
    (received,) = decode_to_core(encode(AddRequests([request]))).requests
    rebuilt = received.sampling_params()
    assert rebuilt == params
    assert isinstance(rebuilt.structured_outputs, StructuredOutputsParams)
    assert rebuilt.structured_outputs.cache_key() == params.structured_outputs.cache_key()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_constrained_rows_on_the_steady_decode_path_sample_what_the_full_path_does(model_folder, monkeypatch,
                                                                                  async_scheduling):
    """Grammar rows (and penalties, watermarks) reuse the steady decode inputs: the same tokens as
    preparing every step from scratch, with their sampling deferred behind a step in flight."""
    from octavo.worker import model_runner

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    params = [SamplingParams(max_tokens=60, temperature=0.7, seed=3 + i,
                             structured_outputs=StructuredOutputsParams(json=schema)) for i in range(3)]
    params += [SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
               SamplingParams(max_tokens=40, temperature=0.9, seed=5, watermark=True, ignore_eos=True)]
    steady_steps = []
    launch_steady = model_runner.ModelRunner._launch_steady
    monkeypatch.setattr(model_runner.ModelRunner, "_launch_steady",
                        lambda self, *args: steady_steps.append(1) or launch_steady(self, *args))
    tokens = {}
    for path in ("steady", "full"):
        if path == "full":
            monkeypatch.setattr(model_runner.ModelRunner, "_steady_inputs", lambda self, *args: None)
        engine = LLM(str(model_folder), device=DEVICE, dtype="float32", async_scheduling=async_scheduling,
                     engine_core_process=False, kv_cache_memory=8 << 20, gpu_memory_utilization=0.2)
        outputs = engine.generate(["Give me a person:"] * len(params), params, use_tqdm=False)
        tokens[path] = [output.outputs[0].token_ids for output in outputs]
        engine.shutdown()
        if path == "steady":
            assert len(steady_steps) > 20, "the constrained batch was meant to run steady decode steps"
    assert tokens["steady"] == tokens["full"]
    for output in tokens["steady"][:3]:
        assert output  # the schema's rows produced tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_grammar_rows_take_the_masked_argmax_with_the_full_samplers_tokens(model_folder, monkeypatch,
                                                                                 async_scheduling):
    """Greedy rows whose only control is a grammar skip the per-row sampler: the same tokens as
    the full sampler, which an identity logits processor forces."""
    from octavo.worker.sampler import Sampler

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    masked_calls = []
    masked = Sampler.sample_masked_greedy
    monkeypatch.setattr(Sampler, "sample_masked_greedy",
                        staticmethod(lambda *args: masked_calls.append(1) or masked(*args)))
    tokens = {}
    for path in ("masked", "full"):
        processors = [lambda output_ids, logits: logits] if path == "full" else None
        params = [SamplingParams(max_tokens=50, temperature=0.0, n=n, logits_processors=processors,
                                 structured_outputs=StructuredOutputsParams(json=schema)) for n in (1, 2, 1)]
        engine = LLM(str(model_folder), device=DEVICE, dtype="float32", async_scheduling=async_scheduling,
                     engine_core_process=False, kv_cache_memory=8 << 20, gpu_memory_utilization=0.2)
        outputs = engine.generate(["Give me a person:", "A person:", "Name and age:"], params, use_tqdm=False)
        tokens[path] = [[sample.token_ids for sample in output.outputs] for output in outputs]
        engine.shutdown()
        if path == "masked":
            assert len(masked_calls) > 20, "the greedy grammar rows were meant to take the masked argmax"
            masked_calls.clear()
    assert not masked_calls
    assert tokens["masked"] == tokens["full"]
    assert all(samples[0] for samples in tokens["masked"])
