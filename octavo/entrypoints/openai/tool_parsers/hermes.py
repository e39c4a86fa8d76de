"""Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

Streamed as OpenAI streams calls: once a block's name is known, a delta with the call's id and
name, then the arguments as they are generated. The arguments are the model's own text: the
JSON after ``"arguments":`` up to the block's closing brace.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Optional

from octavo.entrypoints.openai.tool_parsers.base import (
    StreamPiece,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    call_from_json,
    held_back,
    new_tool_call_id,
)

logger = logging.getLogger(__name__)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
# The usual head of a block; a block written otherwise is sent whole once it closes.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _arguments_so_far(rest: str) -> str:
    """The arguments text in ``rest`` (what follows the head), less what may be the block's own
    closing brace and the blanks around it. Only ever grows as ``rest`` does."""
    text = rest.rstrip()
    if text.endswith("}"):
        text = text[:-1].rstrip()
    return text


def _parse_block(body: str) -> Optional[ToolCall]:
    try:
        value = json.loads(body, strict=False)
    except json.JSONDecodeError:
        logger.info("a <tool_call> block is not valid JSON; it is left out: %r", body[:200])
        return None
    call = call_from_json(value)
    head = _HEAD.match(body)
    if call is not None and head is not None:
        raw = _arguments_so_far(body[head.end():])
        try:
            if json.loads(raw, strict=False) == json.loads(call.arguments, strict=False):
                call.arguments = raw  # the model's own text: what streaming sends
        except json.JSONDecodeError:
            pass
    return call


def _blocks(text: str, start: int) -> list[tuple[str, bool]]:
    """(body, closed) of each ``<tool_call>`` block from ``start``; only the last may be open."""
    blocks = []
    position = start
    while position >= 0:
        body_start = position + len(_OPEN)
        end = text.find(_CLOSE, body_start)
        if end < 0:
            blocks.append((text[body_start:], False))
            break
        blocks.append((text[body_start:end], True))
        position = text.find(_OPEN, end + len(_CLOSE))
    return blocks


@dataclass
class _StreamedCall:
    id: str
    name: Optional[str]  # None until sent (and for a block left out)
    arguments_sent: int = 0
    done: bool = False


class HermesToolParser(ToolParser):
    """Content is the text before the first ``<tool_call>``; each closed block is one call (an
    unclosed last block counts once generation has ended, if its JSON is whole)."""

    def __init__(self) -> None:
        super().__init__()
        self._streamed: list[_StreamedCall] = []

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        start = text.find(_OPEN)
        if start < 0:
            return (text if final else text[: len(text) - held_back(text, _OPEN)]), []
        calls = [_parse_block(body) for body, closed in _blocks(text, start) if closed or final]
        return text[:start], [call for call in calls if call is not None]

    def _new_pieces(self, final: bool) -> StreamPiece:
        text = self._text
        start = text.find(_OPEN)
        if start < 0:
            content = text if final else text[: len(text) - held_back(text, _OPEN)]
            return self._content_piece(content)
        piece = self._content_piece(text[:start])
        for number, (body, closed) in enumerate(_blocks(text, start)):
            if number == len(self._streamed):
                self._streamed.append(_StreamedCall(new_tool_call_id(), None))
            state = self._streamed[number]
            if state.done:
                continue
            index = sum(call.name is not None for call in self._streamed[:number])  # blocks left out skipped
            if closed or final:
                self._finish_block(state, body, index, piece)
            else:
                self._stream_block(state, body, index, piece)
        self._calls_sent = sum(call.name is not None for call in self._streamed)
        return piece

    def _content_piece(self, content: str) -> StreamPiece:
        piece = StreamPiece(content[self._content_sent:])
        self._content_sent = max(self._content_sent, len(content))
        return piece

    def _stream_block(self, state: _StreamedCall, body: str, index: int, piece: StreamPiece) -> None:
        body = body[: len(body) - held_back(body, _CLOSE)]  # the closing tag may be on its way
        head = _HEAD.match(body)
        if head is None:
            return
        arguments = _arguments_so_far(body[head.end():])
        delta = arguments[state.arguments_sent:]
        if state.name is None:
            state.name = json.loads(f'"{head.group(1)}"', strict=False)
            piece.tool_calls.append(ToolCallDelta(index, delta, state.id, state.name))
        elif delta:
            piece.tool_calls.append(ToolCallDelta(index, delta))
        state.arguments_sent = len(arguments)

    def _finish_block(self, state: _StreamedCall, body: str, index: int, piece: StreamPiece) -> None:
        if state.done:
            return
        state.done = True
        if state.name is not None:  # streamed so far: send the rest of the model's text
            head = _HEAD.match(body)
            arguments = _arguments_so_far(body[head.end():]) if head else ""
            if arguments[state.arguments_sent:]:
                piece.tool_calls.append(ToolCallDelta(index, arguments[state.arguments_sent:]))
            return
        call = _parse_block(body)
        if call is None:
            return  # left out, as without streaming
        state.name = call.name
        piece.tool_calls.append(ToolCallDelta(index, call.arguments, state.id, call.name))
