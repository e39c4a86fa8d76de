"""Llama 3.x JSON style: the reply is ``{"name": ..., "parameters": {...}}`` (several separated by
``;``), optionally after ``<|python_tag|>``; a reply that does not start so is plain content."""

from __future__ import annotations

import json

from octavo.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, call_from_json

_PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder(strict=False)  # models may write raw control characters in strings


def decode_objects(body: str, separators: str) -> tuple[list[object], bool]:
    """The complete JSON values at the start of ``body``, separated by whitespace and
    ``separators``; and whether ``body`` held nothing else."""
    values: list[object] = []
    position = 0
    while True:
        while position < len(body) and (body[position].isspace() or body[position] in separators):
            position += 1
        if position == len(body):
            return values, True
        try:
            value, position = _DECODER.raw_decode(body, position)
        except json.JSONDecodeError:
            return values, False
        values.append(value)


class Llama3JsonToolParser(ToolParser):
    def __init__(self) -> None:
        super().__init__()
        self._calls: list[ToolCall] = []

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        stripped = text.lstrip()
        if stripped.startswith(_PYTHON_TAG):
            body = stripped[len(_PYTHON_TAG):]
        elif stripped.startswith("{"):
            body = stripped
        elif not final and _PYTHON_TAG.startswith(stripped):
            return "", []  # undecided yet
        else:
            return text, []
        values, _ = decode_objects(body, ";")
        calls = [call_from_json(value) for value in values]
        if None in calls or (final and not calls):
            return (text if final else ""), []  # JSON, but not tool calls: it is content
        self._calls += calls[len(self._calls):]
        return "", self._calls[: len(calls)]
