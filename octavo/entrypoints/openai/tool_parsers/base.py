"""What every tool-call parser shares: the parsed shapes and the streaming bookkeeping.

A parser reads a model's generated text and splits it into plain content and tool calls.
Subclasses implement ``scan``: from the text so far, the content that is certainly content and
the tool calls that are complete. Streaming then only emits what is new since the last call,
so a call is sent once whole (its id, name and arguments in one delta, which OpenAI clients
accept as they accept arguments split over several deltas); parsers that can tell where the
arguments start (Hermes, a named function) stream them as they are generated instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_tool_call_id)


@dataclass
class ParsedOutput:
    content: Optional[str]
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """A piece of the call at ``index``: the first piece carries its id and name."""

    index: int
    arguments: str
    id: Optional[str] = None
    name: Optional[str] = None


@dataclass
class StreamPiece:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def call_from_json(value: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> Optional[ToolCall]:
    """A ToolCall from ``{"name": ..., "arguments"|"parameters": {...}}``; None for any other shape."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], arguments)


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ToolParser:
    """Parses one choice's output; one instance per choice when streaming."""

    def __init__(self) -> None:
        self._text = ""
        self._content_sent = 0
        self._calls_sent = 0

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        """(content known so far, complete tool calls so far) of ``text``."""
        raise NotImplementedError

    def parse(self, text: str) -> ParsedOutput:
        content, calls = self.scan(text, final=True)
        if calls:  # the whitespace a model puts between its words and its calls is not content
            content = content.strip()
        return ParsedOutput(content or None if calls else content, calls)

    def stream(self, delta: str) -> StreamPiece:
        self._text += delta
        return self._new_pieces(final=False)

    def finish(self) -> StreamPiece:
        return self._new_pieces(final=True)

    @property
    def made_calls(self) -> bool:
        return self._calls_sent > 0

    def _new_pieces(self, final: bool) -> StreamPiece:
        content, calls = self.scan(self._text, final)
        piece = StreamPiece(content[self._content_sent:])
        self._content_sent = max(self._content_sent, len(content))
        for index in range(self._calls_sent, len(calls)):
            call = calls[index]
            piece.tool_calls.append(ToolCallDelta(index, call.arguments, call.id, call.name))
        self._calls_sent = max(self._calls_sent, len(calls))
        return piece
