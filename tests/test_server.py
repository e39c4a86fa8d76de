"""The OpenAI-compatible server, end to end: a real uvicorn server on a loopback port, driven
by the official ``openai`` client and by raw HTTP for the malformed cases."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from octavo.config import CacheConfig, EngineConfig
from octavo.engine.async_engine import AsyncLLMEngine
from octavo.entrypoints.openai.protocol import CompletionRequest
from octavo.entrypoints.openai.server import (
    OpenAIServing,
    ServerSettings,
    _engine_config,
    add_serve_arguments,
    build_app,
)
from octavo.sampling_params import SamplingParams

API_KEY = "test-key"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 512  # the tiny llama's max_position_embeddings
BODY_LIMIT = 256 << 10
KV_CACHE_BYTES = 2 << 20  # 256 blocks of 16 tokens: the concurrency test has to preempt
REPO_ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "core_faults"  # see its sitecustomize.py
PROMPTS = ["Hello, my name is", "The capital of France is", "héllo wörld", "Paris is", "octavo"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Server:
    url: str
    engine: AsyncLLMEngine
    tokenizer: Any
    stop: Callable[[], None]
    serving: OpenAIServing

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def metrics(self) -> dict[str, float]:
        """Sample name (labels dropped) -> value, summed over labels."""
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                key = sample.name + (f"[{sample.labels['finished_reason']}]"
                                     if "finished_reason" in sample.labels else "")
                values[key] = values.get(key, 0.0) + sample.value
        return values


def faults_env(**faults: Any) -> dict[str, str]:
    """Environment for a process whose engine core should slow, hold or fail its steps."""
    env = {f"OCTAVO_TEST_{name.upper()}": str(value) for name, value in faults.items()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def start_server(folder: Path, max_waiting_requests: int = 1024, faults: Optional[dict[str, Any]] = None,
                 engine_options: Optional[dict[str, Any]] = None, **settings: Any) -> Server:
    # Pipelined steps, as on a GPU: outputs trail by one step and aborts meet steps in flight.
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu", async_scheduling=True,
                          cache=CacheConfig(kv_cache_memory=KV_CACHE_BYTES), **(engine_options or {}))
    saved = dict(os.environ)
    os.environ.update(faults_env(**faults) if faults else {})
    try:  # the engine core's process starts here and takes this environment
        async_engine = AsyncLLMEngine(config, max_waiting_requests=max_waiting_requests)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    app = build_app(async_engine, ServerSettings(served_model_name=MODEL, model_path=str(folder), api_key=API_KEY,
                                                 max_request_body_bytes=BODY_LIMIT, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return Server(f"http://127.0.0.1:{port}", async_engine, async_engine.tokenizer, stop, app.state.serving)


@pytest.fixture(scope="module")
def model_folder(tiny_model_factory) -> Path:
    folder, _ = tiny_model_factory("llama", with_tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def server(model_folder):
    running = start_server(model_folder)
    yield running
    running.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def collect_completion_stream(stream) -> tuple[dict[int, str], dict[int, str], Optional[Any]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    return texts, finish, usage


def collect_chat_stream(stream) -> tuple[dict[int, str], dict[int, str], Optional[Any]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    return texts, finish, usage


# ---- basics ------------------------------------------------------------------------------------
def test_health_models_and_metrics(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    metrics = server.metrics()
    for name in ("octavo:num_requests_running", "octavo:num_requests_waiting", "octavo:kv_cache_usage_perc",
                 "octavo:prefix_cache_queries_total", "octavo:prefix_cache_hits_total",
                 "octavo:prompt_tokens_total", "octavo:generation_tokens_total",
                 "octavo:time_to_first_token_seconds_count", "octavo:time_per_output_token_seconds_count",
                 "octavo:e2e_request_latency_seconds_count", "octavo:request_queue_time_seconds_count",
                 "octavo:kv_cache_shared_blocks", "octavo:kv_cache_blocks_saved_by_sharing"):
        assert name in metrics, name


def test_docs_are_not_served(server):
    with server.http() as http:  # not even with the key: nothing there is for clients
        for path in ("/docs", "/redoc", "/openapi.json"):
            _assert_error_shape(http.get(path), 404)


def test_completion_usage_and_finish(server):
    client = server.client()
    prompt = PROMPTS[0]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    (choice,) = result.choices
    assert result.object == "text_completion" and result.model == MODEL
    assert choice.index == 0 and choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(server.tokenizer.encode(prompt))
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6
    metrics = server.metrics()
    assert metrics["octavo:generation_tokens_total"] >= 6
    assert metrics["octavo:request_success_total[length]"] >= 1


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 1234}])
def test_completion_stream_equals_non_stream(server, sampling):
    client = server.client()
    kwargs = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 10, "n": 2, **sampling}
    full = client.completions.create(**kwargs)
    texts, finish, usage = collect_completion_stream(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage.model_dump() == full.usage.model_dump()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}])
def test_chat_stream_equals_non_stream(server, sampling):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, **sampling)
    (choice,) = full.choices
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    expected_prompt = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)
    assert full.usage.prompt_tokens == len(expected_prompt)
    assert 1 <= full.usage.completion_tokens <= 10
    texts, finish, usage = collect_chat_stream(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, stream=True,
        stream_options={"include_usage": True}, **sampling))
    assert texts == {0: choice.message.content}
    assert finish == {0: choice.finish_reason}
    assert usage.model_dump() == full.usage.model_dump()


def test_n_choices_and_multiple_prompts(server):
    client = server.client()
    kwargs = {"model": MODEL, "n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 5,
              "extra_body": {"ignore_eos": True}}
    result = client.completions.create(prompt=PROMPTS[:2], **kwargs)
    assert sorted(c.index for c in result.choices) == list(range(6))
    assert result.usage.prompt_tokens == sum(len(server.tokenizer.encode(p)) for p in PROMPTS[:2])
    assert result.usage.completion_tokens == 6 * 4
    token_prompts = [server.tokenizer.encode(p) for p in PROMPTS[:2]]
    by_ids = client.completions.create(prompt=token_prompts, **kwargs)
    assert [c.text for c in by_ids.choices] == [c.text for c in result.choices]


def test_stop_string(server):
    client = server.client()
    kwargs = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**kwargs).choices[0].text
    stop = next(ch for ch in text[2:] if ch != "\ufffd")
    expected = text[: text.index(stop)]
    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.text == expected and stopped.finish_reason == "stop"
    texts, finish, _ = collect_completion_stream(client.completions.create(stop=stop, stream=True, **kwargs))
    assert texts == {0: expected} and finish == {0: "stop"}
    included = client.completions.create(stop=[stop], **{**kwargs, "extra_body": {
        "ignore_eos": True, "include_stop_str_in_output": True}}).choices[0]
    assert included.text == expected + stop


def test_completion_logprobs_and_echo(server):
    client = server.client()
    prompt = PROMPTS[3]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen >= max(top.values()) - 1e-4  # greedy takes the most likely token

    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=1,
                                       echo=True, extra_body={"ignore_eos": True}).choices[0]
    num_prompt = len(server.tokenizer.encode(prompt))
    assert echoed.text == prompt + result.choices[0].text
    assert len(echoed.logprobs.tokens) == num_prompt + 5
    assert echoed.logprobs.token_logprobs[0] is None
    assert all(value is not None for value in echoed.logprobs.token_logprobs[1:])
    assert echoed.logprobs.token_logprobs[num_prompt:] == pytest.approx(logprobs.token_logprobs, abs=1e-4)


def test_chat_logprobs(server):
    client = server.client()
    result = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                            extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.token == chat_token_name(item.bytes)
        assert item.logprob >= max(top.logprob for top in item.top_logprobs) - 1e-4


def escaped(data: bytes) -> str:
    """OpenAI's spelling of a token that is part of a character: printable ASCII, else \\xNN."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


def chat_token_name(data: list[int]) -> str:
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        return escaped(bytes(data))


def completion_token_bytes(token: str) -> bytes:
    """The bytes a completions ``tokens`` entry stands for (``bytes:\\xe6\\x97`` or the text)."""
    if not token.startswith("bytes:"):
        return token.encode()
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), token[6:]).encode("latin-1")


def test_byte_tokens_show_their_own_bytes(server):
    """Byte-level tokens that each hold part of a character are named by their bytes, as OpenAI
    names them: the bytes join back into the text, and no token shows as U+FFFD."""
    prompt = "héllo 日本"  # 2- and 3-byte characters, each split over byte tokens
    echoed = server.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, logprobs=2, echo=True).choices[0].logprobs
    num_prompt = len(server.tokenizer.encode(prompt))
    prompt_tokens = echoed.tokens[:num_prompt]
    pieces = [completion_token_bytes(token) for token in prompt_tokens]
    assert b"".join(pieces) == prompt.encode()
    assert sum(token.startswith("bytes:") for token in prompt_tokens) >= 5
    assert not any("\ufffd" in token for token in echoed.tokens)
    # Offsets in characters: a character split over tokens counts once, where its first byte is.
    assert echoed.text_offset[:num_prompt] == [
        len(b"".join(pieces[:i]).decode(errors="ignore")) for i in range(num_prompt)]
    assert all(not any("\ufffd" in token for token in top) for top in echoed.top_logprobs[1:])

    result = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=1.0, seed=3,
        logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    content = result.choices[0].logprobs.content
    items = content + [top for item in content for top in item.top_logprobs]
    assert all(item.token == chat_token_name(item.bytes) for item in items)
    assert not any("\ufffd" in item.token for item in items)
    partial = [item for item in items if item.token.startswith("\\x")]
    assert partial and all(len(item.bytes) == item.token.count("\\x") for item in partial)
    joined = b"".join(bytes(item.bytes) for item in content)
    assert joined.decode(errors="replace") == result.choices[0].message.content


def test_token_bytes_of_byte_level_and_byte_fallback_vocabularies(server):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from octavo.entrypoints.openai.token_bytes import TokenBytes

    byte_level = server.tokenizer
    text = "héllo 日本 ok"
    token_bytes = TokenBytes(byte_level)
    ids = byte_level.encode(text)
    assert b"".join(token_bytes(i, byte_level.decode([i])) for i in ids) == text.encode()

    # SentencePiece byte fallback (Llama 2, Mistral): <0xNN> pieces for what the vocabulary lacks.
    vocab = {"<unk>": 0, "\u2581hello": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fallback = PreTrainedTokenizerFast(tokenizer_object=backend)
    token_bytes = TokenBytes(fallback)
    for byte in range(256):
        assert token_bytes(2 + byte, fallback.decode([2 + byte])) == bytes([byte]), byte
    assert token_bytes(1, fallback.decode([1])) == b" hello"


def test_chat_n_choices(server):
    client = server.client()
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "n": 3,
              "max_tokens": 4, "temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in full.choices)
    assert full.usage.completion_tokens == 3 * 4
    assert len({c.message.content for c in full.choices}) > 1  # distinct samples, not one copied
    texts, finish, usage = collect_chat_stream(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage.model_dump() == full.usage.model_dump()


def test_chat_stop_string(server):
    client = server.client()
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Paris is"}], "max_tokens": 12,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = next(ch for ch in text[2:] if ch != "\ufffd")
    expected = text[: text.index(stop)]
    stopped = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.message.content == expected and stopped.finish_reason == "stop"
    texts, finish, _ = collect_chat_stream(client.chat.completions.create(stop=stop, stream=True, **kwargs))
    assert texts == {0: expected} and finish == {0: "stop"}


def test_streamed_completion_logprobs(server):
    client = server.client()
    kwargs = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 2,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kwargs).choices[0]
    text, tokens, chosen, top, offsets = "", [], [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                chosen += choice.logprobs.token_logprobs
                top += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
    assert text == full.text and tokens == full.logprobs.tokens
    assert chosen == pytest.approx(full.logprobs.token_logprobs, abs=1e-4)
    assert [sorted(t) for t in top] == [sorted(t) for t in full.logprobs.top_logprobs]
    assert offsets == full.logprobs.text_offset


def test_streamed_chat_logprobs(server):
    client = server.client()
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
              "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert len(streamed) == len(full) == 5
    for got, want in zip(streamed, full):
        assert got.token == want.token and got.bytes == want.bytes
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert len(got.top_logprobs) == 3


def test_prompt_logprobs(server):
    prompt = PROMPTS[3]
    prompt_ids = server.tokenizer.encode(prompt)
    with server.http() as http:
        body = _completion(prompt=prompt, max_tokens=3, temperature=0, prompt_logprobs=2)
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        echoed = http.post("/v1/completions", json=_completion(
            prompt=prompt, max_tokens=3, temperature=0, logprobs=4, echo=True, prompt_logprobs=1)).json()
        chat = http.post("/v1/chat/completions", json=_chat(prompt_logprobs=0)).json()
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token_id) in entry  # the prompt token itself, plus the top 2
        assert all(e["rank"] <= 2 for t, e in entry.items() if t != str(token_id))
        assert 2 <= len(entry) <= 3
    # The same numbers as echo's logprobs; computed for 4, reported for the 1 asked.
    echo_choice = echoed["choices"][0]
    echo_logprobs = echo_choice["logprobs"]["token_logprobs"][1:len(prompt_ids)]
    prompt_logprobs = [entry[str(t)]["logprob"] for t, entry in zip(prompt_ids[1:], entries[1:])]
    assert echo_logprobs == pytest.approx(prompt_logprobs, abs=1e-4)
    assert all(len(entry) <= 2 for entry in echo_choice["prompt_logprobs"][1:])
    chat_prompt = server.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(chat["prompt_logprobs"]) == len(chat_prompt)
    assert [list(entry) for entry in chat["prompt_logprobs"][1:]] == [[str(t)] for t in chat_prompt[1:]]


def test_no_op_values_of_unsupported_params_are_accepted(server):
    """Clients send these with harmless values by default; refusing them would break them."""
    with server.http() as http:
        completion = _completion(logit_bias={}, suffix="", stream_options={})
        assert http.post("/v1/completions", json=completion).status_code == 200
        chat = _chat(logit_bias=None, response_format={"type": "text"}, tools=[], tool_choice="none",
                     functions=None, function_call="auto", stream_options=None)
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
    result = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, response_format={"type": "text"})
    assert result.choices[0].finish_reason in ("length", "stop")


def test_spaces_between_special_tokens_reaches_sampling_params():
    request = CompletionRequest(prompt="hi", spaces_between_special_tokens=False)
    assert request.to_sampling_params().spaces_between_special_tokens is False
    assert CompletionRequest(prompt="hi").to_sampling_params().spaces_between_special_tokens is True


def test_tokenize_detokenize(server):
    with server.http() as http:
        tokens = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPTS[0]}).json()
        assert tokens["tokens"] == server.tokenizer.encode(PROMPTS[0])
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert text == {"prompt": PROMPTS[0]}


# ---- concurrency and disconnects ---------------------------------------------------------------
def test_concurrent_streams_with_cancellations(server):
    client = server.client()
    references = {
        prompt: client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        for prompt in PROMPTS
    }
    aborted_before = server.metrics().get("octavo:request_success_total[abort]", 0.0)
    num_requests = 120

    async def one(aclient: openai.AsyncOpenAI, i: int) -> Optional[tuple[str, str, int]]:
        cancel = i % 3 == 0
        stream = await aclient.completions.create(
            model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=300 if cancel else 12, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage, chunks = "", None, None, 0
        async for chunk in stream:
            chunks += 1
            if cancel and chunks == 2:
                await stream.close()
                return None
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage.completion_tokens

    async def run_all() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(num_requests)))

    results = asyncio.run(run_all())
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert result is None
        else:
            assert result == (references[PROMPTS[i % len(PROMPTS)]], "length", 12), i

    assert wait_until(lambda: server.metrics()["octavo:kv_cache_usage_perc"] == 0.0)
    metrics = server.metrics()
    assert metrics["octavo:num_requests_running"] == 0 and metrics["octavo:num_requests_waiting"] == 0
    assert metrics["octavo:request_success_total[abort]"] - aborted_before >= num_requests // 3 // 2
    assert server.engine.num_unfinished_requests == 0
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_non_streaming_disconnect_aborts(server):
    aborted_before = server.metrics().get("octavo:request_success_total[abort]", 0.0)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=0.3)
    assert wait_until(lambda: server.metrics().get("octavo:request_success_total[abort]", 0) > aborted_before, 5)
    assert wait_until(lambda: server.metrics()["octavo:kv_cache_usage_perc"] == 0.0, 5)


# ---- metrics -------------------------------------------------------------------------------------
def test_time_per_output_token_per_step(server):
    """One inter-token interval per step that advanced the request: not one mean per request,
    nor one per sample."""
    count = "octavo:time_per_output_token_seconds_count"

    def run(n: int) -> tuple[dict[str, float], dict[str, float]]:
        assert wait_until(lambda: server.metrics()["octavo:num_requests_running"] == 0)
        before = server.metrics()
        server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, n=n, temperature=0,
                                           extra_body={"ignore_eos": True})
        return before, server.metrics()

    before, after = run(1)
    assert after[count] - before[count] == 5  # 6 tokens, 6 steps
    assert after["octavo:time_per_output_token_seconds_sum"] > before["octavo:time_per_output_token_seconds_sum"]
    assert after["octavo:time_to_first_token_seconds_count"] - before["octavo:time_to_first_token_seconds_count"] == 1
    before, after = run(2)
    assert after["octavo:generation_tokens_total"] - before["octavo:generation_tokens_total"] == 12
    # Per sample it would be 10. The forked sample may trail its parent by a step with async
    # scheduling, so the request advances in 6 or 7 steps.
    assert after[count] - before[count] in (5, 6)


def test_request_gauges_and_kv_sharing(model_folder):
    """n=4 is one running request, and its samples share the prompt's blocks until it ends."""
    server = start_server(model_folder, faults={"step_delay_s": 0.01})  # keeps the request running
    seen: dict[str, float] = {}

    def sharing() -> bool:
        seen.update(server.metrics())
        return seen["octavo:kv_cache_blocks_saved_by_sharing"] >= 6

    body = _completion(prompt=[5] * 40, n=4, max_tokens=400, ignore_eos=True, stream=True)
    try:
        with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: closing the iterator would end the request
            next(lines)
            # 40 prompt tokens: two full blocks that all 4 samples hold (3 references each saved).
            assert wait_until(sharing, 10), seen
            assert seen["octavo:kv_cache_shared_blocks"] >= 2
            assert seen["octavo:num_requests_running"] == 1
            assert seen["octavo:num_requests_waiting"] == 0

        def released() -> bool:  # the sharing gauges come with the core's stats, which may trail a step
            seen.update(server.metrics())
            return (seen["octavo:num_requests_running"] == 0 and seen["octavo:kv_cache_shared_blocks"] == 0
                    and seen["octavo:kv_cache_blocks_saved_by_sharing"] == 0)

        assert wait_until(released, 15), seen
    finally:
        server.stop()


def test_gauges_count_requests_while_a_step_runs(model_folder, tmp_path):
    """While the core is busy in one step, the request in it shows as running, and requests that
    arrive meanwhile as waiting at once (the gauges do not wait for the step to end)."""
    hold = tmp_path / "hold"
    hold.touch()  # every step waits, once scheduled, until the file goes
    server = start_server(model_folder, faults={"hold_file": hold})
    try:
        with server.http() as http, server.http() as other:
            first = threading.Thread(target=lambda: http.post("/v1/completions", json=_completion(max_tokens=4)))
            first.start()
            assert wait_until(lambda: server.metrics()["octavo:num_requests_running"] == 1, 10), server.metrics()
            threads = [threading.Thread(target=lambda: other.post("/v1/completions", json=_completion()))
                       for _ in range(3)]
            for thread in threads:
                thread.start()
            assert wait_until(lambda: server.metrics()["octavo:num_requests_waiting"] == 3, 10), server.metrics()
            assert server.metrics()["octavo:num_requests_running"] == 1
            hold.unlink()
            for thread in threads + [first]:
                thread.join(30)
        assert wait_until(lambda: server.metrics()["octavo:num_requests_waiting"] == 0, 10)
        assert wait_until(lambda: server.metrics()["octavo:num_requests_running"] == 0, 10)
    finally:
        hold.unlink(missing_ok=True)
        server.stop()


# ---- bad input ---------------------------------------------------------------------------------
def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


# (path, body: dict or raw bytes, status, param or None, substrings of the message)
BAD_REQUESTS = {
    "malformed-json": ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400, None, ["JSON"]),
    "body-not-object": ("/v1/completions", b"[1, 2]", 400, None, ["object"]),
    "prompt-wrong-type": ("/v1/completions", _completion(prompt=123), 400, "prompt", []),
    "max-tokens-wrong-type": ("/v1/completions", _completion(max_tokens="ten"), 400, "max_tokens", []),
    "max-tokens-negative": ("/v1/completions", _completion(max_tokens=-1), 400, "max_tokens", []),
    "max-tokens-zero": ("/v1/completions", _completion(max_tokens=0), 400, "max_tokens", []),
    "max-tokens-huge": ("/v1/completions", _completion(max_tokens=10**12), 400, "prompt",
                        [str(MAX_MODEL_LEN), str(10**12)]),
    "temperature-too-high": ("/v1/completions", _completion(temperature=1000), 400, "temperature", []),
    "temperature-negative": ("/v1/completions", _completion(temperature=-0.5), 400, "temperature", []),
    "top-p-zero": ("/v1/completions", _completion(top_p=0), 400, "top_p", []),
    "top-p-above-one": ("/v1/completions", _completion(top_p=1.5), 400, "top_p", []),
    "empty-prompt": ("/v1/completions", _completion(prompt=""), 400, "prompt", ["empty"]),
    "empty-prompt-list": ("/v1/completions", _completion(prompt=[]), 400, "prompt", ["empty"]),
    "token-out-of-vocab": ("/v1/completions", _completion(prompt=[1, 10**6]), 400, "prompt", [str(10**6)]),
    "token-negative": ("/v1/completions", _completion(prompt=[[3, -1]]), 400, "prompt", ["-1"]),
    "prompt-over-context": ("/v1/completions", _completion(prompt=[5] * 600), 400, "prompt",
                            [str(MAX_MODEL_LEN), "600"]),
    "prompt-plus-max-tokens": ("/v1/completions", _completion(prompt=[5] * 500, max_tokens=100), 400, "prompt",
                               [str(MAX_MODEL_LEN), "600"]),
    "n-over-limit": ("/v1/completions", _completion(n=1000), 400, "n", ["16"]),
    "logprobs-over-limit": ("/v1/completions", _completion(logprobs=50), 400, "logprobs", ["20"]),
    "too-many-stops": ("/v1/completions", _completion(stop=[str(i) for i in range(20)]), 400, "stop", []),
    "best-of-streamed": ("/v1/completions", _completion(n=1, best_of=3, stream=True), 400, "best_of", []),
    "best-of-below-n": ("/v1/completions", _completion(n=3, best_of=2), 400, "best_of", []),
    "seed-too-large": ("/v1/completions", _completion(seed=2**70), 400, "seed", []),
    "stop-token-negative": ("/v1/completions", _completion(stop_token_ids=[-3]), 400, "stop_token_ids", []),
    "unknown-model": ("/v1/completions", _completion(model="gpt-9"), 404, "model", ["gpt-9"]),
    "chat-no-messages": ("/v1/chat/completions", _chat(messages=[]), 400, "messages", []),
    "chat-image-part": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages", ["image_url"]),
    "chat-top-logprobs-alone": ("/v1/chat/completions", _chat(top_logprobs=2), 400, "top_logprobs", []),
    "chat-negative-max-completion-tokens": ("/v1/chat/completions", _chat(max_completion_tokens=-5), 400,
                                            "max_completion_tokens", []),
    "chat-unknown-model": ("/v1/chat/completions", _chat(model="nope"), 404, "model", []),
    "oversized-body": ("/v1/completions", _completion(prompt="a" * (BODY_LIMIT + 10)), 413, None,
                       [str(BODY_LIMIT)]),
    "detokenize-out-of-vocab": ("/detokenize", {"tokens": [10**6]}, 400, "tokens", []),
    "best-of-over-limit": ("/v1/completions", _completion(best_of=100), 400, "best_of", ["16", "100"]),
    "too-many-prompts": ("/v1/completions", _completion(prompt=["hi"] * 65), 400, "prompt", ["64", "65"]),
    "tokenize-no-prompt": ("/tokenize", {"model": MODEL}, 400, "prompt", ["prompt", "messages"]),
    "detokenize-no-tokens": ("/detokenize", {"model": MODEL}, 400, "tokens", []),
    "nan": ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}', 400, None, ["NaN"]),
    "infinity": ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "top_p": -Infinity}', 400, None,
                 ["Infinity"]),
    "float-overflow": ("/v1/completions", b'{"model": "tiny-llama", "prompt": "hi", "temperature": 1e999}', 400,
                       None, ["1e999"]),
    "logit-bias": ("/v1/completions", _completion(logit_bias={"5": 500}), 400, "logit_bias", ["[-100, 100]"]),
    "suffix": ("/v1/completions", _completion(suffix=" the end"), 400, "suffix", ["not supported"]),
    "chat-logit-bias": ("/v1/chat/completions", _chat(logit_bias={"x": -100}), 400, "logit_bias", []),
    "chat-response-format": ("/v1/chat/completions", _chat(response_format={"type": "json_schema"}), 400,
                             "response_format", ["json_schema.schema"]),
    "chat-tools": ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                 tool_choice={"type": "function", "function": {"name": "g"}}),
                   400, "tool_choice", ["'g'"]),
    "chat-tool-choice": ("/v1/chat/completions", _chat(tool_choice="required"), 400, "tool_choice", []),
    "chat-functions": ("/v1/chat/completions", _chat(functions=[{"name": "f"}]), 400, "functions", []),
    "chat-function-call": ("/v1/chat/completions", _chat(function_call={"name": "f"}), 400, "function_call", []),
    "stream-options-without-stream": ("/v1/completions", _completion(stream_options={"include_usage": True}), 400,
                                      "stream_options", ["stream"]),
    "chat-stream-options-without-stream": ("/v1/chat/completions", _chat(stream_options={"include_usage": True}),
                                           400, "stream_options", []),
    "prompt-logprobs-streamed": ("/v1/completions", _completion(prompt_logprobs=1, stream=True), 400,
                                 "prompt_logprobs", []),
    "prompt-logprobs-over-limit": ("/v1/completions", _completion(prompt_logprobs=50), 400, "prompt_logprobs",
                                   ["20"]),
    # Half of a surrogate pair has no UTF-8 form: it is bad text, whichever field holds it.
    "lone-surrogate": ("/v1/completions", b'{"model": "tiny-llama", "prompt": "a\\ud800b", "max_tokens": 2}', 400,
                       "prompt", ["prompt", "U+D800", "surrogate"]),
    "lone-surrogate-in-list": ("/v1/completions", b'{"prompt": ["ok", "\\uDC00"], "max_tokens": 2}', 400, "prompt",
                               ["prompt[1]", "U+DC00"]),
    "lone-surrogate-in-stop": ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 2}', 400,
                               "stop", ["stop[0]", "U+D83D"]),
    "chat-lone-surrogate": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\udfff"}], '
                            b'"max_tokens": 2}', 400, "messages", ["messages[0].content", "U+DFFF"]),
    "tokenize-lone-surrogate": ("/tokenize", b'{"prompt": "a\\ud800b"}', 400, "prompt", ["U+D800"]),
    "surrogate-as-utf8-bytes": ("/v1/completions", b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 2}', 400, None,
                                ["UTF-8"]),
}


def _assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def _assert_still_serving(http: httpx.Client) -> None:
    good = http.post("/v1/completions", json=_completion())
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_surrogate_pairs_are_text(server):
    with server.http() as http:
        response = http.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00 ok"}',
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] == server.tokenizer.encode("\U0001F600 ok")


def test_completion_max_tokens_null_is_openai_default(server):
    """On /v1/completions a null max_tokens is OpenAI's 16, not the rest of the context; chat
    keeps null as "up to the end of the context"."""
    with server.http() as http:
        completion = http.post("/v1/completions", json=_completion(max_tokens=None, ignore_eos=True)).json()
        assert completion["usage"]["completion_tokens"] == 16
        assert completion["choices"][0]["finish_reason"] == "length"
        long_message = [{"role": "user", "content": "a " * 220}]
        chat = http.post("/v1/chat/completions", json=_chat(messages=long_message, max_tokens=None,
                                                           ignore_eos=True)).json()
    usage = chat["usage"]
    assert MAX_MODEL_LEN - usage["prompt_tokens"] > 16  # the chat case could not pass at 16
    assert usage["total_tokens"] == MAX_MODEL_LEN and chat["choices"][0]["finish_reason"] == "length"


def test_retrieve_model_and_no_server_paths(server, model_folder):
    client = server.client()
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    (listed,) = client.models.list().data
    assert listed.model_dump() | {"created": 0} == card.model_dump() | {"created": 0}
    assert listed.root == model_folder.name and str(model_folder.parent) not in json.dumps(listed.model_dump())
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-9")
    assert "gpt-9" in str(caught.value) and MODEL in str(caught.value)


def test_tokenizer_length_warning_is_not_logged(model_folder, tmp_path):
    """transformers warns once a tokenizer meets text longer than its model_max_length; the engine's
    max_model_len is the limit that counts, so that warning must not reach the log."""
    folder = tmp_path / "short-tokenizer"
    shutil.copytree(model_folder, folder)
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"model_max_length": 32}))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    transformers_log = logging.getLogger("transformers")
    transformers_log.addHandler(handler)
    server = start_server(folder)
    try:
        with server.http() as http:
            _assert_error_shape(http.post("/v1/completions", json=_completion(prompt="a " * 600)), 400)
            assert http.post("/tokenize", json={"prompt": "a " * 100}).status_code == 200
            assert http.post("/v1/completions", json=_completion(prompt="a " * 100)).status_code == 200
        assert not [r for r in records if "sequence length is longer" in r], records
        server.tokenizer.encode("a " * 100)  # the same tokenizer, as loaded, would have warned
        assert [r for r in records if "sequence length is longer" in r]
    finally:
        transformers_log.removeHandler(handler)
        server.stop()


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request(server, case):
    path, body, status, param, fragments = BAD_REQUESTS[case]
    with server.http() as http:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        error = _assert_error_shape(response, status)
        if param is not None:
            assert error["param"] == param, error
        for fragment in fragments:
            assert fragment in error["message"], error
        _assert_still_serving(http)


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}):
        response = httpx.post(f"{server.url}/v1/completions", json=_completion(), headers=headers)
        error = _assert_error_shape(response, 401)
        assert error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with server.http() as http:
        _assert_still_serving(http)


def test_openai_client_error_types(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[5] * 600, max_tokens=2)
    assert "512" in str(caught.value) and "602" in str(caught.value)
    with server.http() as http:
        _assert_error_shape(http.get("/v1/nothing-here"), 404)


# ---- the async engine on its own ----------------------------------------------------------------
def test_async_engine_generate_and_abort(model_folder):
    async_engine = AsyncLLMEngine(EngineConfig(model=str(model_folder), dtype="float32", device="cpu",
                                               cache=CacheConfig(kv_cache_memory=KV_CACHE_BYTES)))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=["zz"])

    async def run() -> None:
        async_engine.start()
        streamed, last = "", None
        async for last in async_engine.generate("full", PROMPTS[0], params):
            streamed += last.deltas[0].text
        assert last.finished and streamed == last.outputs[0].text
        assert len(last.outputs[0].token_ids) == 8

        partial = async_engine.generate("cut", PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True))
        await partial.__anext__()
        await partial.aclose()  # leaving early aborts the request
        assert async_engine.num_unfinished_requests == 0
        with pytest.raises(ValueError):
            await async_engine.add_request("bad", {"prompt_token_ids": []}, params)
        for _ in range(100):  # the core reports its gauges once it is idle again
            stats = async_engine.latest_stats
            if stats is not None and stats.num_running_requests == 0 and stats.kv_cache_usage == 0.0:
                break
            await asyncio.sleep(0.05)
        assert stats.num_running_requests == 0 and stats.kv_cache_usage == 0.0
        await async_engine.shutdown()

    asyncio.run(run())
    assert not async_engine.is_healthy
    assert async_engine.client.process.poll() == 0  # the core process ended cleanly


# ---- overload, engine failure --------------------------------------------------------------------
def test_queue_full_is_503(model_folder, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()  # hold the first request in the queue
    server = start_server(model_folder, max_waiting_requests=1, faults={"hold_file": hold})
    try:
        with server.http() as http, server.http() as other:
            first = threading.Thread(target=lambda: http.post("/v1/completions", json=_completion()))
            first.start()
            assert wait_until(lambda: server.engine.num_waiting_requests == 1, 10)
            error = _assert_error_shape(other.post("/v1/completions", json=_completion()), 503)
            assert "overloaded" in error["message"]
            hold.unlink()
            first.join(30)
            _assert_still_serving(other)
    finally:
        hold.unlink(missing_ok=True)
        server.stop()


def test_overload_refused_before_the_body_is_read(model_folder):
    """Requests still sending their body count against the queue limit: the next one gets 503
    with Retry-After at once, and the slow one is served when it arrives."""
    server = start_server(model_folder, max_waiting_requests=1)
    gate = threading.Event()
    result: dict[str, int] = {}

    def slow_body():
        yield b'{"model": "tiny-llama", '
        gate.wait(30)
        yield b'"prompt": "Hello", "max_tokens": 2}'

    def send_slowly() -> None:
        with server.http() as http:
            result["status"] = http.post("/v1/completions", content=slow_body(),
                                         headers={"Content-Type": "application/json"}).status_code

    sender = threading.Thread(target=send_slowly)
    try:
        with server.http() as http:
            # A first request pays the one-time costs (kernels loaded on first use) before the clock starts.
            assert http.post("/v1/completions", json=_completion()).status_code == 200
            sender.start()
            # Wait for the slow request's admission without competing with it: a completion sent
            # meanwhile could hold the one queue place at the moment it arrives and see it refused.
            assert wait_until(lambda: server.serving.num_admitting == 1, 10)
            assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 200  # never reaches the queue
            refused = http.post("/v1/completions", json=_completion())
            error = _assert_error_shape(refused, 503)
            assert "overloaded" in error["message"] and error["code"] == "server_overloaded"
            assert refused.headers["Retry-After"] == "1"
            assert server.engine.num_waiting_requests == 0  # refused before anything was queued
            gate.set()
            sender.join(30)
            assert result["status"] == 200
            assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 200
            _assert_still_serving(http)
    finally:
        gate.set()
        server.stop()


def test_engine_failure_marks_unhealthy(model_folder):
    """A step that raises ends the core loudly: every request after it gets 503 engine_dead."""
    server = start_server(model_folder, faults={"fail_step": 1})
    try:
        with server.http() as http:
            error = _assert_error_shape(http.post("/v1/completions", json=_completion()), 503)
            assert "dead" in error["message"] and "simulated device failure" in error["message"]
            assert error["code"] == "engine_dead"
            streamed = http.post("/v1/completions", json=_completion(stream=True))
            assert streamed.status_code == 503
            health = _assert_error_shape(httpx.get(f"{server.url}/health"), 503)
            assert health["code"] == "engine_dead"
            assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert wait_until(lambda: server.engine.client.process.poll() is not None, 10)
        assert server.engine.client.process.returncode == 1
    finally:
        server.stop()


# ---- the command line ----------------------------------------------------------------------------
def test_serve_engine_flags():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    default = _engine_config(parser.parse_args([]), "m")
    assert default.cache.enable_prefix_caching and not default.enforce_eager
    assert default.async_scheduling is None and default.load_format == "auto" and not default.allow_pickle_weights
    config = _engine_config(parser.parse_args(["--no-prefix-caching", "--enforce-eager", "--no-async-scheduling",
                                               "--load-format", "dummy", "--allow-pickle-weights"]), "m")
    assert not config.cache.enable_prefix_caching and config.enforce_eager
    assert config.async_scheduling is False and config.load_format == "dummy" and config.allow_pickle_weights


# ---- graceful shutdown -------------------------------------------------------------------------
_SERVE_SCRIPT = """
import argparse, sys
from octavo.entrypoints.openai.server import add_serve_arguments, run_server

parser = argparse.ArgumentParser()
add_serve_arguments(parser)
run_server(parser.parse_args(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_stream(url: str, body: dict[str, Any], first_chunk: threading.Event, result: dict[str, Any]) -> None:
    """Read an SSE completion stream into ``result``: text, finish reasons, error events, [DONE]."""
    result.update(text="", finish=[], errors=[], done=False)
    try:
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            for line in response.iter_lines():
                first_chunk.set()
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        result["errors"].append(event["error"])
                    for choice in event.get("choices", []):
                        result["text"] += choice["text"]
                        result["finish"].append(choice["finish_reason"])
    finally:
        first_chunk.set()


def _start_serve_process(model_folder: Path, shutdown_timeout: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE_SCRIPT, str(model_folder), "--port", str(port), "--dtype", "float32",
         "--device", "cpu", "--kv-cache-memory", "2MiB", "--served-model-name", MODEL,
         "--shutdown-timeout", str(shutdown_timeout)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A predictable pace, so that one request outlives the drain and one does not.
        env={**os.environ, **faults_env(step_delay_s=0.02)},
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(healthy, 180), "the server did not come up"
    return process, url


def _assert_shutting_down(response: httpx.Response) -> None:
    """The documented answer while draining: a JSON 503 saying the server is shutting down."""
    error = _assert_error_shape(response, 503)
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"], error


def _post_json(url: str, body: dict[str, Any], result: dict[str, Any]) -> None:
    response = httpx.post(url, json=body, timeout=120)
    result.update(status=response.status_code, body=response.json())


def test_sigterm_drains_in_flight_requests(model_folder):
    """SIGTERM: the server keeps listening while it drains, answering /health and new requests
    with 503 "shutting down"; a short in-flight request finishes, a long one is aborted with an
    error event at --shutdown-timeout, and the process exits with status 0."""
    process, url = _start_serve_process(model_folder, shutdown_timeout=2)
    try:
        short, long = {}, {}
        started = [threading.Event(), threading.Event()]
        readers = [
            threading.Thread(target=_read_stream, args=(f"{url}/v1/completions", _completion(
                max_tokens=8, stream=True, ignore_eos=True), started[0], short)),
            threading.Thread(target=_read_stream, args=(f"{url}/v1/completions", _completion(
                max_tokens=480, stream=True, ignore_eos=True), started[1], long)),
        ]
        for reader in readers:
            reader.start()
        assert all(event.wait(60) for event in started)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        _assert_shutting_down(httpx.get(f"{url}/health"))
        _assert_shutting_down(httpx.post(f"{url}/v1/completions", json=_completion()))
        for reader in readers:
            reader.join(120)
        # Interpreter teardown after torch can be slow on a loaded machine: allow for it.
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    assert short["done"] and short["finish"][-1] == "length" and not short["errors"], short
    assert long["done"] and "length" not in long["finish"], long
    assert long["errors"] and "shutting down" in long["errors"][0]["message"], long
    assert url in log and "KV cache" in log and "max_model_len 512" in log, log
    assert "float32" in log and "device cpu" in log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT)],
                         ids=["sigterm-twice", "sigint-twice"])
def test_second_signal_ends_the_drain_in_order(model_folder, signals):
    """A second signal ends in-flight requests at once, long before --shutdown-timeout: a stream
    with an error event and [DONE], a non-streaming request with a JSON 503, and no traceback."""
    process, url = _start_serve_process(model_folder, shutdown_timeout=120)
    try:
        streamed, plain = {}, {}
        started = threading.Event()
        body = _completion(max_tokens=480, ignore_eos=True)
        readers = [
            threading.Thread(target=_read_stream, args=(f"{url}/v1/completions", body | {"stream": True}, started,
                                                        streamed)),
            threading.Thread(target=_post_json, args=(f"{url}/v1/completions", body, plain)),
        ]
        for reader in readers:
            reader.start()
        assert started.wait(60)

        def both_running() -> bool:
            metrics = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            return any(sample.name == "octavo:num_requests_running" and sample.value == 2
                       for family in metrics for sample in family.samples)

        assert wait_until(both_running, 30)
        process.send_signal(signals[0])
        time.sleep(0.5)
        _assert_shutting_down(httpx.get(f"{url}/health"))
        process.send_signal(signals[1])
        hurried = time.monotonic()
        for reader in readers:
            reader.join(60)
        assert process.wait(timeout=120) == 0
        assert time.monotonic() - hurried < 60  # not the 120 s drain
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    assert streamed["done"] and "length" not in streamed["finish"], streamed
    assert streamed["errors"] and "shutting down" in streamed["errors"][0]["message"], streamed
    assert plain["status"] == 503 and plain["body"]["error"]["code"] == "server_shutting_down", plain
    assert "Traceback" not in log and "CancelledError" not in log, log


def _core_pids(server_pid: int) -> list[int]:
    """The server's child processes: its engine core (Linux /proc)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the core process through /proc")
def test_killed_engine_core_fails_requests_and_exits(model_folder):
    """The core process killed mid-stream: the stream ends with an engine_dead error and [DONE],
    new requests and /health get 503 engine_dead, and the server exits non-zero within seconds."""
    process, url = _start_serve_process(model_folder, shutdown_timeout=30)
    try:
        (core_pid,) = _core_pids(process.pid)
        streamed, started = {}, threading.Event()
        reader = threading.Thread(target=_read_stream, args=(f"{url}/v1/completions", _completion(
            max_tokens=480, stream=True, ignore_eos=True), started, streamed))
        reader.start()
        assert started.wait(60)
        os.kill(core_pid, signal.SIGKILL)
        reader.join(30)
        assert streamed["done"] and streamed["errors"], streamed
        assert streamed["errors"][0]["code"] == "engine_dead", streamed
        try:  # inside the grace period the server still answers, with 503
            response = httpx.post(f"{url}/v1/completions", json=_completion(), headers=AUTH, timeout=5)
            assert _assert_error_shape(response, 503)["code"] == "engine_dead"
        except httpx.TransportError:
            pass  # already gone
        assert process.wait(timeout=30) == 1
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    assert "engine core" in log and "exited with code -9" in log, log
