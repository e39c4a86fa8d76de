"""The OpenAI-compatible HTTP server behind ``octavo serve``.

``build_app`` wires an ``AsyncLLMEngine`` into a FastAPI app: /v1/completions,
/v1/chat/completions, /v1/models (and /v1/models/{id}), /tokenize, /detokenize, /health and
/metrics. Every request is validated here, before the engine sees it, and every failure is
answered in OpenAI's error shape; no request can stop the engine. ``run_server`` builds the
engine from CLI arguments and serves it with uvicorn, draining in-flight requests on
SIGTERM/SIGINT while it still answers (see ``_DrainingServer``).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import copy
import errno
import hmac
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from octavo import __version__
from octavo.config import CacheConfig, EngineConfig, SchedulerConfig
from octavo.engine.async_engine import (
    AsyncLLMEngine,
    CompletionDelta,
    EngineDeadError,
    EngineOverloadedError,
    EngineUnavailableError,
    RequestStream,
    StreamingRequestOutput,
)
from octavo.entrypoints.cli import (
    add_engine_arguments,
    add_log_level_argument,
    ignore_tokenizer_length_limit,
    non_negative_float,
    parse_bytes,
    port_number,
    positive_int,
)
from octavo.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    ChatResponseMessage,
    ChatToolCall,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    PromptLogprob,
    PromptLogprobEntries,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
)
from octavo.entrypoints.openai.token_bytes import TokenBytes, escaped, is_whole_text
from octavo.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    NamedToolParser,
    RequiredToolParser,
    StreamPiece,
    ToolParser,
)
from octavo.metrics import CONTENT_TYPE, EngineMetrics
from octavo.outputs import CompletionOutput, Logprob, PromptLogprobs
from octavo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)

# JSON has no -inf: a token the model rules out is reported with this logprob instead.
_MIN_LOGPROB = -9999.0
# Seconds uvicorn waits, once the drain is over, for responses to be written before it cancels them.
_SHUTDOWN_BACKSTOP_S = 5.0
# After the engine core dies, the server answers 503 for this long, then exits non-zero.
_DEAD_ENGINE_GRACE_S = 1.0
# nginx's "client closed request": the status of a response nobody will read.
_CLIENT_CLOSED_REQUEST = 499
_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


@dataclass
class ServerSettings:
    """What the HTTP layer enforces; each limit keeps one request from hogging the server."""

    served_model_name: str
    model_path: Optional[str] = None
    api_key: Optional[str] = None
    max_n: int = 16
    max_best_of: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_prompts_per_request: int = 64
    max_request_body_bytes: int = 8 << 20
    tool_call_parser: Optional[str] = None  # a TOOL_PARSERS name: finds calls when tool_choice is auto


# ---- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def _bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def _unavailable(error: EngineUnavailableError) -> APIError:
    if isinstance(error, EngineOverloadedError):
        return APIError(503, str(error), "server_error", code="server_overloaded", headers={"Retry-After": "1"})
    code = "engine_dead" if isinstance(error, EngineDeadError) else "server_shutting_down"
    return APIError(503, str(error), "server_error", code=code)


def _as_api_error(error: Exception) -> APIError:
    """The API error for anything raised while serving (used where a response is already streaming)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineUnavailableError):
        return _unavailable(error)
    if isinstance(error, ValueError):  # the engine refused the request's input
        return _bad_request(str(error))
    return APIError(500, f"internal server error ({type(error).__name__}).", "server_error")


def _validation_error(error: ValidationError) -> APIError:
    details = error.errors(include_url=False)
    param = ".".join(str(part) for part in details[0]["loc"][:1]) or None
    shown = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in details[:4])
    more = f" (and {len(details) - 4} more)" if len(details) > 4 else ""
    return _bad_request(f"invalid request: {shown}{more}", param)


def _param_of(message: str, request: BaseModel, aliases: dict[str, str]) -> Optional[str]:
    """The parameter a conversion ValueError names: its first word, when that is a field."""
    name = message.split(" ", 1)[0].split(".", 1)[0]  # "structured_outputs.regex ..." names structured_outputs
    if name not in _SAMPLING_FIELDS and name not in type(request).model_fields:
        return None
    return aliases.get(name, name)


# ---- request reading -----------------------------------------------------------------------
# A \uD800-style escape: the one way left for a lone surrogate into strictly decoded UTF-8 text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON and would pass range checks.
    raise _bad_request(f"the request body is not valid JSON: {name} is not a JSON number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf
        raise _bad_request(f"the request body is not valid JSON: {text} is out of a number's range.")
    return value


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes (checked before and while reading), 400 if malformed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad_request(f"the request body is not valid UTF-8: byte {exc.start} cannot start or "
                           "continue a character.") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise _bad_request(f"the request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_no_lone_surrogate(data)
    return data


def _check_no_lone_surrogate(data: Any) -> None:
    """400 naming the first string (or key) that holds half of a surrogate pair: such text has no
    UTF-8 form, so no tokenizer, template or response could handle it."""
    # (top-level field, where in the body, value); the next one to look at last.
    pending: list[tuple[Optional[str], str, Any]] = [(None, "the body", data)]
    while pending:
        field, where, value = pending.pop()
        if isinstance(value, dict):
            for key, child in reversed(value.items()):
                shown = key.encode("utf-8", "backslashreplace").decode()
                pending.append((field or shown, shown if field is None else f"{where}.{shown}", child))
                pending.append((field, f"a key in {where}", key))
        elif isinstance(value, list):
            pending.extend((field, f"{where}[{i}]", child) for i, child in reversed(list(enumerate(value))))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _bad_request(
                    f"{where} is not valid Unicode text: it holds a lone surrogate "
                    f"(U+{ord(value[exc.start]):04X}) at character {exc.start}; a surrogate escape must be "
                    "half of a pair, such as \\ud83d\\ude00.", field) from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes.", code="request_too_large")


async def _parse(request: Request, model: type[ModelT], limit: int) -> ModelT:
    data = await _read_json(request, limit)
    if not isinstance(data, dict):
        raise _bad_request("the request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (call only once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # no-op once done
    if not task.done() or task.cancelled():
        raise APIError(_CLIENT_CLOSED_REQUEST, "the client disconnected.")
    return task.result()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamingRequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:  # the common case, without a task per output
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(stream.__anext__()): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(streams[index].__anext__())] = index
                yield index, output
    finally:
        for task in pending:
            task.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends: finished, failed, or
    cut short by a client disconnect (even one before the first event)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


# ---- serving -------------------------------------------------------------------------------
@dataclass
class _Prompt:
    token_ids: list[int]
    text: Optional[str] = None  # as sent, when sent as text


@dataclass
class _Token:
    """One token as logprobs show it: its text, and its own bytes (part of a character for some
    byte-level and byte-fallback tokens, whose text is then U+FFFD)."""

    text: str
    data: bytes

    @property
    def completion_name(self) -> str:
        return self.text if is_whole_text(self.data) else f"bytes:{escaped(self.data)}"

    @property
    def chat_name(self) -> str:
        return self.text if is_whole_text(self.data) else escaped(self.data)


class _TextOffset:
    """Where each token's text starts in a completion, in characters, counted over the tokens'
    bytes: a character spelled by several tokens counts once, where all of them start."""

    def __init__(self) -> None:
        self._position = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def advance(self, data: bytes) -> int:
        """The offset of a token with bytes ``data``, which then moves past it."""
        start = self._position
        self._position += len(self._decoder.decode(data))
        return start


class OpenAIServing:
    """Request handling: validation, conversion to engine requests, responses in OpenAI's shapes."""

    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        # A private tokenizer copy, so the front end never shares one with the step thread's
        # detokenizers; prompts are encoded on one worker thread so long ones never block the loop.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        ignore_tokenizer_length_limit(self.tokenizer)
        self._token_bytes = TokenBytes(self.tokenizer)
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="octavo-tokenizer")
        self.num_admitting = 0  # requests let in and not yet queued in the engine (or answered)

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, lambda: fn(*args, **kwargs))

    # ---- admission ---------------------------------------------------------------------
    @contextlib.contextmanager
    def admission(self) -> Iterator[Callable[[], None]]:
        """Let a request in, or answer 503 before reading its body. Requests still being read or
        tokenized count against the queue limit with the queued ones, so a flood is refused
        before it costs any work. Yields the release, for once the request is queued; leaving
        the block releases it in any case."""
        try:
            self.engine.check_can_accept(self.num_admitting)
        except EngineUnavailableError as exc:
            raise _unavailable(exc) from None
        self.num_admitting += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.num_admitting -= 1

        try:
            yield release
        finally:
            release()

    # ---- validation --------------------------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves "
                                f"`{self.settings.served_model_name}`.", param="model", code="model_not_found")

    def _sampling_params(self, request: SamplingRequest, aliases: dict[str, str]) -> SamplingParams:
        try:
            params = request.to_sampling_params()
        except ValueError as exc:
            raise _bad_request(str(exc), _param_of(str(exc), request, aliases)) from None
        self._check_limits(params, aliases)
        if request.stream and params.num_samples > params.n:
            raise _bad_request("best_of greater than n cannot be streamed.", "best_of")
        return params

    def _check_limits(self, params: SamplingParams, aliases: dict[str, str]) -> None:
        settings = self.settings
        max_logprobs = min(settings.max_logprobs, self.engine.vocab_size)
        checks = [
            ("n", params.n, settings.max_n),
            ("best_of", params.best_of or 0, settings.max_best_of),
            ("logprobs", params.logprobs or 0, max_logprobs),
            ("prompt_logprobs", params.prompt_logprobs or 0, max_logprobs),
            ("stop", len(params.stop), settings.max_stop_strings),
        ]
        for name, value, limit in checks:
            if value > limit:
                param = aliases.get(name, name)
                what = "stop strings" if name == "stop" else param
                raise _bad_request(f"{what} must be at most {limit}, got {value}.", param)

    def _check_prompt(self, prompt: _Prompt, params: SamplingParams, param: str) -> None:
        """Empty prompts, ids outside the vocabulary, prompt + max_tokens over the context: 400."""
        try:
            self.engine.validate_prompt(prompt.token_ids, params)
        except ValueError as exc:
            raise _bad_request(str(exc), param) from None

    def _require_tokenizer(self, param: str) -> Any:
        if self.tokenizer is None:
            raise _bad_request("this model has no tokenizer: send token ids instead of text.", param)
        return self.tokenizer

    # ---- prompts -----------------------------------------------------------------------
    async def _completion_prompts(self, prompt: Any) -> list[_Prompt]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise _bad_request("the prompt is empty: give at least one token.", "prompt")
        if len(prompt) > self.settings.max_prompts_per_request:
            raise _bad_request(f"at most {self.settings.max_prompts_per_request} prompts per request, "
                               f"got {len(prompt)}.", "prompt")
        if not isinstance(prompt[0], str):
            return [_Prompt(list(ids)) for ids in prompt]
        tokenizer = self._require_tokenizer("prompt")
        encoded = await self._off_loop(lambda: [tokenizer.encode(text) for text in prompt])
        return [_Prompt(ids, text) for ids, text in zip(encoded, prompt)]

    async def _chat_token_ids(self, messages: list, add_generation_prompt: bool,
                              tools: Optional[list[dict[str, Any]]] = None) -> list[int]:
        if not messages:
            raise _bad_request("messages must not be empty.", "messages")
        tokenizer = self._require_tokenizer("messages")
        try:
            conversation = [message.template_dict() for message in messages]
            token_ids = await self._off_loop(tokenizer.apply_chat_template, conversation, tools=tools,
                                             add_generation_prompt=add_generation_prompt, tokenize=True,
                                             return_dict=False)
        except Exception as exc:  # noqa: BLE001 - a template can fail in many ways, all on the input
            raise _bad_request(f"the chat template could not be applied: {exc}", "messages") from None
        return list(token_ids)

    def _prompt_text(self, prompt: _Prompt) -> str:
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids) if self.tokenizer is not None else ""
        return prompt.text

    # ---- engine requests -----------------------------------------------------------------
    async def _add_all(self, request_id: str, prompts: list[_Prompt], params: SamplingParams,
                       cache_salt: Optional[str]) -> list[RequestStream]:
        """Submit every prompt at once (one round trip to the step thread); all or none are kept."""
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        inputs = [{"prompt_token_ids": p.token_ids, "prompt": p.text, "cache_salt": cache_salt} for p in prompts]
        results = await asyncio.gather(
            *(self.engine.add_request(rid, engine_input, params) for rid, engine_input in zip(ids, inputs)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return list(results)
        self.engine.abort([s.request_id for s in results if isinstance(s, RequestStream)])
        if isinstance(failures[0], ValueError):
            raise _bad_request(str(failures[0])) from None
        if isinstance(failures[0], EngineUnavailableError):
            raise _unavailable(failures[0]) from None
        raise failures[0]

    def _abort_unfinished(self, streams: list[RequestStream]) -> None:
        self.engine.abort([stream.request_id for stream in streams if not stream.finished])

    async def _final_outputs(self, streams: list[RequestStream]) -> list[StreamingRequestOutput]:
        finals: list[Optional[StreamingRequestOutput]] = [None] * len(streams)
        async for index, output in _merge(streams):
            finals[index] = output
        return finals

    async def _generate_all(self, raw: Request, streams: list[RequestStream]) -> list[StreamingRequestOutput]:
        try:
            return await _unless_disconnected(raw, self._final_outputs(streams))
        except EngineUnavailableError as exc:
            raise _unavailable(exc) from None
        finally:
            self._abort_unfinished(streams)

    def _event_stream(self, streams: list[RequestStream], events: AsyncIterator[str]) -> _EventStream:
        return _EventStream(events, on_close=lambda: self._abort_unfinished(streams))

    # ---- logprobs ----------------------------------------------------------------------
    def _token_text(self, token_id: int, logprob: Optional[Logprob]) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def _token(self, token_id: int, logprob: Optional[Logprob]) -> _Token:
        text = self._token_text(token_id, logprob)
        return _Token(text, self._token_bytes(token_id, text))

    def _top(self, entry: dict[int, Logprob], num: int) -> list[tuple[_Token, float]]:
        ranked = sorted((lp.rank, token_id, lp) for token_id, lp in entry.items() if lp.rank is not None)
        return [(self._token(token_id, lp), max(lp.logprob, _MIN_LOGPROB)) for _, token_id, lp in ranked[:num]]

    def _completion_logprobs(self, token_ids: list[int], entries: list[Optional[dict[int, Logprob]]],
                             num_top: int, offset: _TextOffset) -> CompletionLogProbs:
        """OpenAI's completion logprobs; ``offset`` is where the first token's text starts."""
        result = CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry is not None else None
            token = self._token(token_id, chosen)
            result.tokens.append(token.completion_name)
            result.token_logprobs.append(None if chosen is None else max(chosen.logprob, _MIN_LOGPROB))
            result.top_logprobs.append(None if entry is None else {
                top.completion_name: logprob for top, logprob in self._top(entry, num_top)})
            result.text_offset.append(offset.advance(token.data))
        return result

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int) -> ChatLogProbs:
        content = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id)
            token = self._token(token_id, chosen)
            content.append(ChatLogProbsContent(
                token=token.chat_name,
                logprob=max(chosen.logprob, _MIN_LOGPROB) if chosen is not None else _MIN_LOGPROB,
                bytes=list(token.data),
                top_logprobs=[ChatLogProb(token=top.chat_name, logprob=logprob, bytes=list(top.data))
                              for top, logprob in self._top(entry, num_top)],
            ))
        return ChatLogProbs(content=content)

    def _prompt_logprobs(self, prompt: _Prompt, entries: Optional[PromptLogprobs],
                         num: Optional[int]) -> Optional[PromptLogprobEntries]:
        """vLLM's ``prompt_logprobs``: per prompt token its own logprob and the top ``num``."""
        if num is None or entries is None:
            return None
        return [
            None if entry is None else {
                token_id: PromptLogprob(logprob=max(lp.logprob, _MIN_LOGPROB), rank=lp.rank,
                                        decoded_token=self._token_text(token_id, lp))
                for token_id, lp in entry.items()
                # The engine may have computed more (echo with more logprobs): keep what was asked.
                if token_id == prompt_token or (lp.rank is not None and lp.rank <= num)
            }
            for prompt_token, entry in zip(prompt.token_ids, entries)
        ]

    @staticmethod
    def _usage(prompts: list[_Prompt], finals: list[Optional[StreamingRequestOutput]]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    # ---- /v1/completions ---------------------------------------------------------------
    async def create_completion(self, request: CompletionRequest, raw: Request,
                                queued: Callable[[], None]) -> Response:
        """``queued`` is called once the request is in the engine's queue (see ``admission``)."""
        self.check_model(request.model)
        params = self._sampling_params(request, {})
        prompts = await self._completion_prompts(request.prompt)
        for prompt in prompts:
            self._check_prompt(prompt, params, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._add_all(request_id, prompts, params, request.cache_salt)
        queued()
        if request.stream:
            return self._event_stream(streams, self._completion_events(request_id, request, params, prompts, streams))
        finals = await self._generate_all(raw, streams)
        choices = []
        for i, output in enumerate(finals):
            prompt_logprobs = self._prompt_logprobs(prompts[i], output.prompt_logprobs, request.prompt_logprobs)
            for completion in output.outputs:
                whole = CompletionDelta(completion.text, completion.token_ids, completion.logprobs)
                if request.echo:
                    whole = self._with_echo(whole, prompts[i], output)
                choice = self._completion_choice(params, completion, whole, i * params.n + completion.index,
                                                 _TextOffset())
                choice.prompt_logprobs = prompt_logprobs
                choices.append(choice)
        response = CompletionResponse(id=request_id, model=self.settings.served_model_name, choices=choices,
                                      usage=self._usage(prompts, finals))
        return Response(response.model_dump_json(), media_type="application/json")

    def _with_echo(self, part: CompletionDelta, prompt: _Prompt, output: StreamingRequestOutput) -> CompletionDelta:
        """``part`` preceded by the prompt, and by the prompt's logprobs when logprobs are on."""
        logprobs = None if part.logprobs is None else (output.prompt_logprobs or []) + part.logprobs
        return CompletionDelta(self._prompt_text(prompt) + part.text, prompt.token_ids + part.token_ids, logprobs)

    def _completion_choice(self, params: SamplingParams, completion: CompletionOutput, part: CompletionDelta,
                           index: int, offset: _TextOffset) -> CompletionChoice:
        """A choice carrying ``part`` of ``completion``, whose text starts at ``offset``."""
        logprobs = None
        if params.logprobs is not None:
            logprobs = self._completion_logprobs(part.token_ids, part.logprobs, params.logprobs, offset)
        return CompletionChoice(index=index, text=part.text, logprobs=logprobs,
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)

    async def _completion_events(self, request_id: str, request: CompletionRequest, params: SamplingParams,
                                 prompts: list[_Prompt], streams: list[RequestStream]) -> AsyncIterator[str]:
        model, created = self.settings.served_model_name, int(time.time())
        finals: list[Optional[StreamingRequestOutput]] = [None] * len(streams)
        # choice index -> text offset of its next token, counted over the tokens so far as without
        # streaming (the streamed text can lag behind the tokens while a stop string may be forming).
        offsets: dict[int, _TextOffset] = {}
        started: set[int] = set()
        try:
            async for i, output in _merge(streams):
                finals[i] = output
                choices = []
                for completion, delta in zip(output.outputs, output.deltas):
                    index = i * params.n + completion.index
                    if index not in started and request.echo:
                        delta = self._with_echo(delta, prompts[i], output)
                    started.add(index)
                    if delta.text or completion.finish_reason or (params.logprobs is not None and delta.token_ids):
                        offset = offsets.setdefault(index, _TextOffset())
                        choices.append(self._completion_choice(params, completion, delta, index, offset))
                if choices:
                    yield _sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=choices))
            if request.include_usage:
                yield _sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                    usage=self._usage(prompts, finals)))
        except Exception as exc:  # noqa: BLE001 - the status is sent; report the error in-stream
            yield _sse(_as_api_error(exc).body)
        yield _SSE_DONE

    # ---- /v1/chat/completions ------------------------------------------------------------
    async def create_chat_completion(self, request: ChatCompletionRequest, raw: Request,
                                     queued: Callable[[], None]) -> Response:
        """``queued`` is called once the request is in the engine's queue (see ``admission``)."""
        self.check_model(request.model)
        aliases = {"logprobs": "top_logprobs"}
        if request.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        params = self._sampling_params(request, aliases)
        self._tool_parser(request)  # a 400 now, not once the reply is generated
        prompt = _Prompt(await self._chat_token_ids(request.messages, bool(request.add_generation_prompt),
                                                    request.template_tools()))
        self._check_prompt(prompt, params, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._add_all(request_id, [prompt], params, request.cache_salt)
        queued()
        if request.stream:
            return self._event_stream(streams, self._chat_events(request_id, request, params, prompt, streams[0]))
        (final,) = await self._generate_all(raw, streams)
        choices = []
        for completion in final.outputs:
            parser = self._tool_parser(request)
            message = ChatResponseMessage(content=completion.text)
            finish_reason = completion.finish_reason
            if parser is not None:
                parsed = parser.parse(completion.text)
                message = ChatResponseMessage(content=parsed.content, tool_calls=[
                    ChatToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                    for call in parsed.tool_calls
                ])
                finish_reason = _tool_finish_reason(finish_reason, bool(parsed.tool_calls))
            choices.append(ChatCompletionChoice(
                index=completion.index,
                message=message,
                logprobs=(self._chat_logprobs(completion.token_ids, completion.logprobs, params.logprobs)
                          if params.logprobs is not None else None),
                finish_reason=finish_reason,
                stop_reason=completion.stop_reason,
            ))
        response = ChatCompletionResponse(
            id=request_id, model=self.settings.served_model_name, choices=choices,
            usage=self._usage([prompt], [final]),
            prompt_logprobs=self._prompt_logprobs(prompt, final.prompt_logprobs, request.prompt_logprobs))
        return Response(response.model_dump_json(), media_type="application/json")

    def _tool_parser(self, request: ChatCompletionRequest) -> Optional[ToolParser]:
        """A fresh parser for one choice's output, or None when the output is plain text."""
        mode = request.tool_mode
        if mode == "named":
            return NamedToolParser(request.named_tool().function.name)
        if mode == "required":
            return RequiredToolParser()
        if mode == "auto":
            name = self.settings.tool_call_parser
            if name is None:
                raise _bad_request('tool_choice "auto" needs a server started with --tool-call-parser '
                                   f'({", ".join(TOOL_PARSERS)}); or send tool_choice "required" or a '
                                   'named function, which need no parser.', "tool_choice")
            return TOOL_PARSERS[name]()
        return None

    async def _chat_events(self, request_id: str, request: ChatCompletionRequest, params: SamplingParams,
                           prompt: _Prompt, stream: RequestStream) -> AsyncIterator[str]:
        model, created = self.settings.served_model_name, int(time.time())

        def chunk(choices: list[ChatCompletionStreamChoice], usage: Optional[UsageInfo] = None) -> str:
            return _sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices,
                                                     usage=usage))

        parsers = [self._tool_parser(request) for _ in range(params.n)]
        final = None
        try:
            yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(params.n)])
            async for final in stream:
                choices = []
                for completion, delta in zip(final.outputs, final.deltas):
                    parser = parsers[completion.index]
                    finish_reason = completion.finish_reason
                    message = DeltaMessage(content=delta.text)
                    if parser is not None:
                        piece = parser.stream(delta.text)
                        if finish_reason is not None:
                            rest = parser.finish()
                            piece = StreamPiece(piece.content + rest.content, piece.tool_calls + rest.tool_calls)
                            finish_reason = _tool_finish_reason(finish_reason, parser.made_calls)
                        message = _delta_message(piece)
                    if message.content or message.tool_calls or finish_reason or (
                            params.logprobs is not None and delta.token_ids):
                        choices.append(ChatCompletionStreamChoice(
                            index=completion.index, delta=message,
                            logprobs=(self._chat_logprobs(delta.token_ids, delta.logprobs, params.logprobs)
                                      if params.logprobs is not None else None),
                            finish_reason=finish_reason, stop_reason=completion.stop_reason))
                if choices:
                    yield chunk(choices)
            if request.include_usage:
                yield chunk([], self._usage([prompt], [final]))
        except Exception as exc:  # noqa: BLE001 - the status is sent; report the error in-stream
            yield _sse(_as_api_error(exc).body)
        yield _SSE_DONE

    # ---- /tokenize, /detokenize --------------------------------------------------------
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise _bad_request("give exactly one of prompt and messages.", "prompt")
        if request.messages is not None:
            tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
            tokens = await self._chat_token_ids(request.messages, bool(request.add_generation_prompt), tools)
        else:
            tokenizer = self._require_tokenizer("prompt")
            tokens = await self._off_loop(tokenizer.encode, request.prompt,
                                          add_special_tokens=bool(request.add_special_tokens))
        return TokenizeResponse(count=len(tokens), max_model_len=self.engine.max_model_len, tokens=tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        tokenizer = self._require_tokenizer("tokens")
        vocab = self.engine.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise _bad_request(f"token id {bad} is out of the vocabulary [0, {vocab}).", "tokens")
        return DetokenizeResponse(prompt=await self._off_loop(tokenizer.decode, request.tokens))

    def model_card(self) -> ModelCard:
        # The file or folder name only: the server's paths are nobody else's business.
        root = Path(self.settings.model_path).name if self.settings.model_path else None
        return ModelCard(id=self.settings.served_model_name, root=root, max_model_len=self.engine.max_model_len)

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])


def _tool_finish_reason(finish_reason: Optional[str], made_calls: bool) -> Optional[str]:
    """OpenAI's "tool_calls" for a reply that ended normally with calls in it."""
    return "tool_calls" if made_calls and finish_reason == "stop" else finish_reason


def _delta_message(piece: StreamPiece) -> DeltaMessage:
    calls = [
        DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                      function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
        for call in piece.tool_calls
    ]
    return DeltaMessage(content=piece.content or None, tool_calls=calls or None)


# ---- the app -------------------------------------------------------------------------------
def _api_key_check(settings: ServerSettings) -> Callable[[Request], Awaitable[None]]:
    expected = settings.api_key.encode() if settings.api_key else None

    async def check_api_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'.",
                           "authentication_error", code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "incorrect API key provided.", "authentication_error", code="invalid_api_key")

    return check_api_key


def _api_routes(serving: OpenAIServing) -> APIRouter:
    """The key-protected routes (everything but /health and /metrics). Generation requests pass
    ``admission`` before their body is read."""
    router = APIRouter(dependencies=[Depends(_api_key_check(serving.settings))])
    limit = serving.settings.max_request_body_bytes

    @router.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        with serving.admission() as queued:
            return await serving.create_completion(await _parse(raw, CompletionRequest, limit), raw, queued)

    @router.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        with serving.admission() as queued:
            return await serving.create_chat_completion(await _parse(raw, ChatCompletionRequest, limit), raw,
                                                        queued)

    @router.get("/v1/models")
    async def models() -> ModelList:
        return serving.models()

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return serving.model_card()

    @router.post("/tokenize")
    async def tokenize(raw: Request) -> TokenizeResponse:
        # No admission: the engine's queue does not limit work that never reaches it.
        return await serving.tokenize(await _parse(raw, TokenizeRequest, limit))

    @router.post("/detokenize")
    async def detokenize(raw: Request) -> DetokenizeResponse:
        return await serving.detokenize(await _parse(raw, DetokenizeRequest, limit))

    return router


def _open_routes(engine: AsyncLLMEngine) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return APIError(503, "the engine is dead.", "server_error", code="engine_dead").response()
        if not engine.accepting:
            return APIError(503, "the server is shutting down and takes no new requests.", "server_error",
                            code="server_shutting_down").response()
        if engine.dead_replicas:  # still serving on the live replicas: 200, and says which died
            return JSONResponse({"status": "degraded", "replicas": engine.num_replicas,
                                 "dead_replicas": sorted(engine.dead_replicas)})
        return Response(status_code=200)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    return router


def _add_exception_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def engine_unavailable(_: Request, exc: EngineUnavailableError) -> JSONResponse:
        return _unavailable(exc).response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers).response()

    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _bad_request(f"invalid request: {exc.errors()}").response()

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after answering, so uvicorn logs the traceback; the server stays up.
        return _as_api_error(exc).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(EngineUnavailableError, engine_unavailable)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(Exception, unexpected)


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine's step thread and shuts it down."""
    serving = OpenAIServing(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()
            serving.close()

    # No /docs, /redoc or /openapi.json: they would be open without the API key.
    app = FastAPI(title="octavo", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = serving  # for whoever embeds the app: its admission count, its settings
    app.include_router(_api_routes(serving))
    app.include_router(_open_routes(engine))
    _add_exception_handlers(app)
    return app


# ---- the command line ----------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser, log_level_default: Optional[str] = "info") -> None:
    """The arguments of ``octavo serve`` (``log_level_default``: the ``octavo`` command passes
    ``argparse.SUPPRESS``, as its own ``--log-level`` before the command supplies the default)."""
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (default: $OCTAVO_API_KEY; none if unset)")
    server.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    server.add_argument("--shutdown-timeout", type=non_negative_float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM/SIGINT (a second signal "
                             "ends them at once)")
    add_log_level_argument(server, log_level_default)

    # The same engine flags as generate and chat.
    add_engine_arguments(parser.add_argument_group("engine"), model_positional=True)

    tools = parser.add_argument_group("tool calling")
    tools.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="how to find tool calls in replies when tool_choice is auto (the default with "
                            "tools): hermes for <tool_call> JSON blocks (Hermes, Qwen), llama3_json for Llama 3 "
                            "JSON calls. Without it only tool_choice required or a named function work.")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM compatibility: auto tool choice is on whenever "
                            "--tool-call-parser is given.")

    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-n", type=positive_int, default=16, help="largest n")
    limits.add_argument("--max-best-of", type=positive_int, default=16, help="largest best_of")
    limits.add_argument("--max-logprobs", type=positive_int, default=20, help="largest logprobs / top_logprobs")
    limits.add_argument("--max-stop-strings", type=positive_int, default=16, help="most stop strings in a request")
    limits.add_argument("--max-prompts-per-request", type=positive_int, default=64,
                        help="most prompts in one /v1/completions request")
    limits.add_argument("--max-request-body-bytes", type=parse_bytes, default=8 << 20,
                        help="largest request body, e.g. 8MiB (default: 8MiB); larger ones get 413")
    limits.add_argument("--max-waiting-requests", type=positive_int, default=1024,
                        help="requests waiting for their first token (or still being read and tokenized) "
                             "beyond which new ones get 503")


def _engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model=model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        allow_pickle_weights=args.allow_pickle_weights,
        enforce_eager=args.enforce_eager,
        async_scheduling=False if args.no_async_scheduling else None,
        quantization=args.quantization,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        gguf_weights=args.gguf_weights,
        cache=CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens),
    )


def _server_settings(args: argparse.Namespace, served_model_name: str, model: str) -> ServerSettings:
    return ServerSettings(
        served_model_name=served_model_name,
        model_path=model,
        api_key=args.api_key or os.environ.get("OCTAVO_API_KEY") or None,
        max_n=args.max_n,
        max_best_of=args.max_best_of,
        max_logprobs=args.max_logprobs,
        max_stop_strings=args.max_stop_strings,
        max_prompts_per_request=args.max_prompts_per_request,
        max_request_body_bytes=args.max_request_body_bytes,
        tool_call_parser=args.tool_call_parser,
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn, stopping in order on SIGTERM/SIGINT.

    The first signal stops the engine taking requests: new ones and /health get 503 "shutting
    down" while in-flight ones have ``drain_timeout`` seconds to finish. A second signal ends them
    at once. Requests cut short are answered, with an error event and ``[DONE]`` on a stream and
    a JSON 503 otherwise. Only then does uvicorn stop listening and close the connections (its
    signal handling would stop listening at once and, on a second signal, cancel requests
    mid-response). The process exits with status 0 rather than re-raising the signal.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._drain_timeout = drain_timeout
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain: Optional[asyncio.Task] = None
        self._hurry: Optional[asyncio.Event] = None

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._hurry = asyncio.Event()
        await super().serve(sockets)

    def exit_after_engine_death(self, _: BaseException) -> None:
        """Answer in-flight and new requests with 503 for a moment, then stop serving, so that the
        process exits non-zero and a supervisor restarts it."""
        asyncio.get_running_loop().call_later(_DEAD_ENGINE_GRACE_S, setattr, self, "should_exit", True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler may interrupt the loop anywhere: hand the work to the loop.
        if self._loop is None:
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._drain is None:
            logger.info("%s: shutting down; in-flight requests get up to %gs to finish (send the signal again "
                        "to end them now)", name, self._drain_timeout)
            self._engine.begin_drain()
            self._drain = asyncio.ensure_future(self._drain_then_exit())
        elif not self._hurry.is_set():
            logger.info("%s again: ending the in-flight requests now", name)
            self._hurry.set()

    async def _drain_then_exit(self) -> None:
        drained = asyncio.ensure_future(self._engine.drain(self._drain_timeout))
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({drained, hurried}, return_when=asyncio.FIRST_COMPLETED)
            if not drained.done():
                await self._engine.drain(0.0)
            await drained
        finally:
            hurried.cancel()
            self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now so that a bad host or a port in use is reported before the
    model loads (uvicorn would find out only after). It listens once the server starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r} is not an address to listen on ({exc.strerror}).") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over lingering connections
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use: stop what holds it or choose another "
                             "--port.") from None
        raise ValueError(f"cannot listen on {host} port {port}: {exc.strerror}.") from None
    return sock


def run_server(args: argparse.Namespace) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (arguments from ``add_serve_arguments``)."""
    log_level = getattr(args, "log_level", None) or "info"
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model
    if model is None:
        from octavo.model_loader.default_model import default_model_path

        model = str(default_model_path())
    served_model_name = args.served_model_name or args.model or Path(model).stem
    config = _engine_config(args, model)
    settings = _server_settings(args, served_model_name, model)
    with contextlib.closing(_listening_socket(args.host, args.port)) as listener:
        async_engine = AsyncLLMEngine(config, args.max_waiting_requests, EngineMetrics(served_model_name),
                                      log_level=log_level)
        app = build_app(async_engine, settings)
        info = async_engine.info
        host = f"[{args.host}]" if ":" in args.host else args.host
        logger.info(
            "serving %s as %r on http://%s:%d | dtype %s | device %s | KV cache %d tokens | max_model_len %d%s%s",
            model, served_model_name, host, args.port, info.dtype, info.device, info.num_blocks * info.block_size,
            info.max_model_len, " | API key required" if settings.api_key else "",
            f" | {config.data_parallel_size} replicas" if config.data_parallel_size > 1 else "",
        )
        # The drain ends requests before uvicorn stops; its deadline is only a backstop for
        # responses still being written then.
        uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level,
                                        timeout_graceful_shutdown=_SHUTDOWN_BACKSTOP_S)
        server = _DrainingServer(uvicorn_config, async_engine, args.shutdown_timeout)
        async_engine.on_dead.append(server.exit_after_engine_death)
        server.run(sockets=[listener])
    if async_engine.is_dead:
        logger.error("exiting: the engine core died (%s)", async_engine.dead_reason)
        raise SystemExit(1)
