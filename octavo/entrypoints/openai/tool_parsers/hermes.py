"""Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

from __future__ import annotations

import json
import logging
import re

from octavo.entrypoints.openai.tool_parsers.base import ToolCall, ToolParser, call_from_json, held_back

logger = logging.getLogger(__name__)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)


class HermesToolParser(ToolParser):
    """Content is the text before the first ``<tool_call>``; each closed block is one call (an
    unclosed last block counts once generation has ended, if its JSON is whole)."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: list[ToolCall] = []  # parsed so far, kept so their ids stay stable

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        start = text.find(_OPEN)
        if start < 0:
            return (text if final else text[: len(text) - held_back(text, _OPEN)]), []
        bodies = [match.group(1) for match in _BLOCK.finditer(text, start)]
        if final:
            tail_start = text.rfind(_CLOSE) + len(_CLOSE) if _CLOSE in text[start:] else start
            tail = text.find(_OPEN, tail_start)
            if tail >= 0:
                bodies.append(text[tail + len(_OPEN):])
        calls = [call for call in map(_parse_body, bodies) if call is not None]
        self._calls += calls[len(self._calls):]
        return text[:start], self._calls[: len(calls)]


def _parse_body(body: str):
    try:
        return call_from_json(json.loads(body, strict=False))
    except json.JSONDecodeError:
        logger.info("a <tool_call> block is not valid JSON; it is left out: %r", body[:200])
        return None
