"""Request and response bodies of the OpenAI-compatible API, in OpenAI's shapes.

Requests accept OpenAI's parameters plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, min_tokens, prompt_logprobs, allowed_token_ids, bad_words, structured
outputs as ``structured_outputs`` or the older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``) and TGI's ``watermark``. Unknown fields are ignored, as
OpenAI clients send vendor fields through ``extra_body``; OpenAI parameters that octavo cannot
honour (the legacy ``functions``, ...) are refused unless their value is a no-op, never
silently dropped.
``to_sampling_params`` turns a request into ``SamplingParams``; it and ``SamplingParams``'s own
checks raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from octavo.sampling_params import SamplingParams
from octavo.structured_output.params import StructuredOutputsParams

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


class JsonSchemaFormat(OpenAIBaseModel):
    name: Optional[str] = None
    description: Optional[str] = None
    # ``schema`` would shadow a pydantic BaseModel attribute, hence the alias.
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


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
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[StrictInt]] = None
    bad_words: Optional[list[StrictStr]] = None
    watermark: Optional[bool] = False
    # Structured output: OpenAI's response_format, or vLLM's fields (one of them).
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[StrictStr]] = None
    guided_grammar: Optional[str] = None

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
        return []

    def structured_output_constraint(self) -> Optional[StructuredOutputsParams]:
        """The constraint that response_format or vLLM's fields ask for (at most one of them)."""
        given: list[tuple[str, dict[str, Any]]] = []
        response_format = self.response_format
        if response_format is not None and response_format.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.json_schema is None:
                raise ValueError("response_format with type json_schema needs json_schema.schema.")
            given.append(("response_format", {"json": response_format.json_schema.json_schema}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", dict(self.structured_outputs)))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {key: getattr(self, name)}))
        if len(given) > 1:
            raise ValueError(f"{given[0][0]} and {given[1][0]} both constrain the output: give one of them.")
        return StructuredOutputsParams.from_value(given[0][1]) if given else None

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
                         prompt_logprobs: Optional[int] = None,
                         structured_outputs: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        """SamplingParams with OpenAI's defaults for parameters sent as null or left out."""
        self._check_request()
        if structured_outputs is None:
            structured_outputs = self.structured_output_constraint()
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
            structured_outputs=structured_outputs,
            logit_bias=self.logit_bias or None,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or None,
            watermark=bool(self.watermark),
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


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ChatToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: StrictStr
    content: Optional[Union[StrictStr, list[ChatContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ChatToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a "tool" message: the call it answers

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it: text parts joined into one string, and
        tool-call arguments as objects (templates write them with ``tojson``)."""
        content = self.content
        if isinstance(content, list):
            others = sorted({part.type for part in content if part.type != "text"})
            if others:
                raise ValueError(f"only text content parts are supported, got {', '.join(others)}.")
            content = "\n".join(part.text or "" for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDefinition(OpenAIBaseModel):
    name: StrictStr
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: dict[str, Any]


def _parameters_schema(function: FunctionDefinition) -> dict[str, Any]:
    return function.parameters or {"type": "object", "properties": {}}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = True
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = True
    # The legacy function-calling fields: accepted only as no-ops, see ``unsupported_params``.
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None

    def unsupported_params(self) -> list[str]:
        no_call = (None, "none", "auto")
        checks = [
            ("functions", bool(self.functions)),
            ("function_call", self.function_call not in no_call),
        ]
        return super().unsupported_params() + [name for name, unsupported in checks if unsupported]

    @property
    def tool_mode(self) -> str:
        """"none" (plain text), "auto" (a parser finds calls in free text), "required" or
        "named" (the grammar engine enforces the calls' shape)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def named_tool(self) -> ChatTool:
        name = self.tool_choice.function.get("name")
        tool = next((t for t in self.tools or () if t.function.name == name), None)
        if tool is None:
            known = ", ".join(t.function.name for t in self.tools or ())
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools ({known}).")
        return tool

    def tool_call_constraint(self) -> Optional[StructuredOutputsParams]:
        """For ``required`` and a named function, the JSON schema that the output must match."""
        mode = self.tool_mode
        if mode == "named":
            schema = _parameters_schema(self.named_tool().function)
        elif mode == "required":
            calls = [
                {"type": "object",
                 "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                "parameters": _parameters_schema(tool.function)},
                 "required": ["name", "parameters"]}
                for tool in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if self.parallel_tool_calls is False:
                schema["maxItems"] = 1
        else:
            return None
        # Compact JSON: arguments as a client would write them, and no whitespace to wander in.
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools as the chat template gets them (none when tool_choice is "none")."""
        if self.tool_mode == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """``max_completion_tokens`` (OpenAI's current name), else the legacy ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true.")
        logprobs = _default(self.top_logprobs, 0) if self.logprobs else None
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice required or a named function needs tools.")
        constraint = self.tool_call_constraint()
        if constraint is not None and self.structured_output_constraint() is not None:
            raise ValueError("tool_choice required or named already fixes the output's shape: "
                             "leave out response_format and the structured_outputs fields.")
        return self._sampling_params(self.requested_max_tokens, logprobs, self.prompt_logprobs, constraint)


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
    tool_calls: list[ChatToolCall] = Field(default_factory=list)


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


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


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
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template, with ``tools``)."""

    model: Optional[str] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ChatTool]] = None
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
