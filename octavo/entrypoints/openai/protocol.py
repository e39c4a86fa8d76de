"""Request and response bodies of the OpenAI-compatible API, in OpenAI's shapes.

Requests accept OpenAI's parameters plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, min_tokens, prompt_logprobs, ...). Unknown fields are ignored, as OpenAI
clients send vendor fields through ``extra_body``; OpenAI parameters that octavo cannot honour
(logit_bias, tools, ...) are refused unless their value is a no-op, never silently dropped.
``to_sampling_params`` turns a request into ``SamplingParams``; it and ``SamplingParams``'s own
checks raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from octavo.sampling_params import SamplingParams

# Anything beyond a signed 64-bit seed is refused before it reaches torch's generator.
_SEED_BOUND = 2**63
# OpenAI's max_tokens on /v1/completions when it is left out or sent as null.
COMPLETION_DEFAULT_MAX_TOKENS = 16


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- errors ------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- shared request parts ------------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: Optional[bool] = False


class SamplingRequest(OpenAIBaseModel):
    """The sampling parameters that completions and chat completions share."""

    model: Optional[str] = None
    n: Optional[int] = 1
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = Field(default=None, ge=-_SEED_BOUND, lt=_SEED_BOUND)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[int] = 0
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    skip_special_tokens: Optional[bool] = True
    spaces_between_special_tokens: Optional[bool] = True
    include_stop_str_in_output: Optional[bool] = False
    prompt_logprobs: Optional[int] = None
    cache_salt: Optional[str] = None
    # Accepted only with values that change nothing; see ``unsupported_params``.
    logit_bias: Optional[dict[str, float]] = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_params(self) -> list[str]:
        """Parameters set to a value whose effect octavo does not implement."""
        return ["logit_bias"] if self.logit_bias else []

    def _check_request(self) -> None:
        unsupported = self.unsupported_params()
        if unsupported:
            raise ValueError(f"{unsupported[0]} is not supported by this server.")
        # As vLLM: an empty object is harmless, any option without streaming is a mistake.
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true.")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true.")

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                         prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """SamplingParams with OpenAI's defaults for parameters sent as null or left out."""
        self._check_request()
        return SamplingParams(
            n=_default(self.n, 1),
            best_of=self.best_of,
            presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            temperature=_default(self.temperature, 1.0),
            top_p=_default(self.top_p, 1.0),
            top_k=_default(self.top_k, 0),
            min_p=_default(self.min_p, 0.0),
            seed=self.seed,
            stop=self.stop_list,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=bool(self.ignore_eos),
            max_tokens=max_tokens,
            min_tokens=_default(self.min_tokens, 0),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=_default(self.skip_special_tokens, True),
            spaces_between_special_tokens=_default(self.spaces_between_special_tokens, True),
        )


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


# ---- completions -------------------------------------------------------------------------
Prompt = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: Optional[int] = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    def unsupported_params(self) -> list[str]:
        return super().unsupported_params() + (["suffix"] if self.suffix else [])

    def to_sampling_params(self) -> SamplingParams:
        # With echo, the prompt's own logprobs are part of the answer: compute enough for both.
        wanted = [self.prompt_logprobs]
        if self.echo and self.logprobs is not None:
            wanted.append(self.logprobs)
        prompt_logprobs = max((n for n in wanted if n is not None), default=None)
        # An explicit null is OpenAI's default too, never "up to the end of the context".
        max_tokens = _default(self.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's shape of one token's prompt logprob (keyed by token id in ``prompt_logprobs``)."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# Per prompt token: token id -> its logprob; the first entry (no context) is null.
PromptLogprobEntries = list[Optional[dict[int, PromptLogprob]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[PromptLogprobEntries] = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ---- chat completions --------------------------------------------------------------------
class ChatContentPart(OpenAIBaseModel):
    type: str
    text: Optional[str] = None


class ChatMessage(OpenAIBaseModel):
    role: StrictStr
    content: Optional[Union[StrictStr, list[ChatContentPart]]] = None
    name: Optional[str] = None

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it: text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            others = sorted({part.type for part in content if part.type != "text"})
            if others:
                raise ValueError(f"only text content parts are supported, got {', '.join(others)}.")
            content = "\n".join(part.text or "" for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(OpenAIBaseModel):
    type: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = True
    # No structured output or tool calling: accepted only as no-ops, see ``unsupported_params``.
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None

    def unsupported_params(self) -> list[str]:
        # "none" forbids calls and "auto" with no tools cannot make one: both are plain generation.
        no_call = (None, "none", "auto")
        checks = [
            ("response_format", self.response_format is not None and self.response_format.type != "text"),
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in no_call),
            ("functions", bool(self.functions)),
            ("function_call", self.function_call not in no_call),
        ]
        return super().unsupported_params() + [name for name, unsupported in checks if unsupported]

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """``max_completion_tokens`` (OpenAI's current name), else the legacy ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true.")
        logprobs = _default(self.top_logprobs, 0) if self.logprobs else None
        return self._sampling_params(self.requested_max_tokens, logprobs, self.prompt_logprobs)


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: Optional[list[ChatLogProbsContent]] = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[PromptLogprobEntries] = None


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---- models ------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "octavo"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenize / detokenize -------------------------------------------------------------------
class TokenizeRequest(OpenAIBaseModel):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model: Optional[str] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = True
    add_generation_prompt: Optional[bool] = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str
