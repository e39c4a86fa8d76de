"""Tool calling and response_format through a real server: the official ``openai`` client and
LangChain's ``bind_tools`` / ``with_structured_output`` against a tiny random model with a real
tokenizer and a chat template that renders tools (see ``structured_fixtures``)."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from octavo.entrypoints.openai.tool_parsers import HermesToolParser, Llama3JsonToolParser, RequiredToolParser
from tests.structured_fixtures import build_structured_model
from tests.test_server import MODEL, start_server

pytest.importorskip("xgrammar")

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    build_structured_model(folder)
    running = start_server(folder, tool_call_parser="hermes")
    yield running
    running.stop()


def check_calls(tool_calls, names=None) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(stream) -> dict[int, dict]:
    """Per choice: content, tool calls (joined from their deltas, as clients join them), finish reason."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            state = choices.setdefault(choice.index, {"content": "", "calls": {}, "finish_reason": None})
            state["content"] += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = state["calls"].setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            state["finish_reason"] = choice.finish_reason or state["finish_reason"]
    return choices


def test_named_tool_choice_is_enforced(server):
    client = server.client()
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=120, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls, {"get_time"})
    state = collect_stream(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=120, seed=2, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}}))[0]
    (call,) = state["calls"].values()  # the arguments streamed as generated, joined by the client
    assert state["finish_reason"] == "tool_calls" and call["name"] == "get_time" and call["id"].startswith("call_")
    assert call["arguments"] == choice.message.tool_calls[0].function.arguments


def test_required_n_and_streamed(server):
    client = server.client()
    # A random model has no reason to stop calling tools; a bias towards "]" stands in for one.
    close = {str(server.tokenizer.convert_tokens_to_ids("]")): 5}
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              max_tokens=200, seed=2, n=3, logit_bias=close)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
    streamed = collect_stream(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=2, n=3,
        logit_bias=close, stream=True))
    assert sorted(streamed) == [0, 1, 2]
    for index, choice in enumerate(response.choices):
        state = streamed[index]
        assert state["finish_reason"] == "tool_calls" and state["content"] == ""
        # Same seed, same calls: the stream carries what the plain response carries.
        assert [(c["name"], c["arguments"]) for c in state["calls"].values()] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_parallel_tool_calls_false_allows_one_call(server):
    response = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=200, seed=4, n=4)
    for choice in response.choices:
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_auto_tool_choice_parses_hermes_calls(server):
    """tool_choice auto: the hermes parser finds the calls in free text. A regex makes the random
    model write one, with words before it, and the stream splits it as the plain response does."""
    regex = r'Let me check\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\n</tool_call>'
    client = server.client()
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=100, seed=3,
                  extra_body={"structured_outputs": {"regex": regex}})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    check_calls(choice.message.tool_calls, {"get_time"})
    state = collect_stream(client.chat.completions.create(stream=True, **kwargs))[0]
    assert state["content"].strip() == "Let me check." and state["finish_reason"] == "tool_calls"
    (call,) = state["calls"].values()
    assert call["name"] == "get_time" and json.loads(call["arguments"]) == json.loads(
        choice.message.tool_calls[0].function.arguments)


def test_tool_history_is_rendered_by_the_template(server):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    with server.http() as http:
        tokens = http.post("/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    text = server.tokenizer.decode(tokens)
    assert '"name": "get_weather"' in text and '"description": "The weather in a city."' in text  # the tools
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text  # the call
    assert "<tool_response>\n21 degrees and sunny\n</tool_response>" in text  # the result
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=5,
                                                     tool_choice="none")
    assert reply.choices[0].message.tool_calls in (None, [])


def test_response_format_json_schema_and_parse(server):
    client = server.client()

    class Weather(BaseModel):
        city: str = Field(pattern=r"^[A-Z][a-z]{1,8}$")
        unit: Literal["celsius", "fahrenheit"]

    parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Weather,
                                           max_tokens=150, seed=1)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    state = collect_stream(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=150, seed=5,
                                                          n=2, response_format=response_format, stream=True))
    for choice in state.values():
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["content"]), WEATHER)
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, seed=1,
                                           extra_body={"guided_choice": ["alpha", "beta"]})
    assert completion.choices[0].text in ("alpha", "beta")


def test_bad_tool_requests_are_400(server):
    import openai

    client = server.client()
    cases = [
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
        dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
        dict(extra_body={"guided_regex": "a", "guided_choice": ["b"]}),
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, **case)


def test_auto_without_a_parser_is_400(tmp_path):
    import openai

    build_structured_model(tmp_path)
    running = start_server(tmp_path)
    try:
        with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
            running.client().chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=5)
    finally:
        running.stop()


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")

    class get_time(BaseModel):  # noqa: N801 - the class name is the tool's name
        """The time in a zone."""

        zone: Literal["UTC", "CET"]

    class Weather(BaseModel):
        city: str = Field(pattern=r"^[A-Z][a-z]{1,8}$")
        unit: Literal["celsius", "fahrenheit"]

    chat = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="test-key",
                                       max_tokens=150, seed=1, max_retries=0)
    message = chat.bind_tools([get_time], tool_choice="get_time").invoke("What time is it?")
    (call,) = message.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("UTC", "CET")
    message = chat.bind_tools([get_time], tool_choice="any").invoke("What time is it?")
    assert message.tool_calls and all(c["name"] == "get_time" for c in message.tool_calls)
    for method in ("json_schema", "function_calling"):
        result = chat.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
        assert isinstance(result, Weather)


# ---- parsers on their own -------------------------------------------------------------------
def stream_in_pieces(parser, text: str, size: int):
    """(content, [(name, arguments)]) as a client joins the streamed deltas."""
    pieces = [parser.stream(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    content = "".join(p.content for p in pieces)
    calls: dict[int, list] = {}
    for delta in (d for p in pieces for d in p.tool_calls):
        if delta.index not in calls:
            assert delta.id and delta.name  # the first delta of a call names it
            calls[delta.index] = [delta.name, ""]
        else:
            assert delta.id is None and delta.name is None
        calls[delta.index][1] += delta.arguments
    return content, [tuple(call) for _, call in sorted(calls.items())]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_hermes_parser(size):
    text = ('I will call three.\n<tool_call>\n{"name": "f", "arguments": {"a": {"b": "} x"}}}\n</tool_call>\n'
            '<tool_call>not json</tool_call><tool_call>{"arguments": {"c": 2}, "name": "g"}</tool_call>'
            '<tool_call>{"name": "h", "arguments": {}}')  # the last block unclosed: generation ended
    parsed = HermesToolParser().parse(text)
    assert parsed.content == "I will call three."
    expected = [("f", {"a": {"b": "} x"}}), ("g", {"c": 2}), ("h", {})]
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == expected
    content, calls = stream_in_pieces(HermesToolParser(), text, size)
    assert content.strip() == "I will call three."
    assert calls == [(c.name, c.arguments) for c in parsed.tool_calls]  # the same calls, streamed
    parser = HermesToolParser()
    deltas = [d for i in range(0, len(text), size) for d in parser.stream(text[i:i + size]).tool_calls]
    if size == 1:  # arguments arrive as they are generated, not once the block closes
        assert sum(d.index == 0 for d in deltas) > 5
    assert HermesToolParser().parse("no calls <tool_ here").content == "no calls <tool_ here"
    assert stream_in_pieces(HermesToolParser(), "a <tool_x> b", size) == ("a <tool_x> b", [])


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_llama3_json_parser(size):
    text = '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}'
    parsed = Llama3JsonToolParser().parse(text)
    assert parsed.content is None and [c.name for c in parsed.tool_calls] == ["f", "g"]
    assert stream_in_pieces(Llama3JsonToolParser(), text, size)[1] == [("f", '{"a": 1}'), ("g", "{}")]
    for plain in ("Hello there", '{"not": "a call"}', '{"name": "f", "parameters": {'):
        assert Llama3JsonToolParser().parse(plain).content == plain
        assert stream_in_pieces(Llama3JsonToolParser(), plain, size) == (plain, [])


def test_required_parser_streams_each_call_once_complete():
    parser = RequiredToolParser()
    first = parser.stream('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "par')
    assert [d.name for d in first.tool_calls] == ["f"]
    rest = parser.stream('ameters": {}}]')
    assert [d.name for d in rest.tool_calls] == ["g"] and not parser.finish().tool_calls
