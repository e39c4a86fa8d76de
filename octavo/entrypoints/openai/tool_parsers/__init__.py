"""Tool-call parsers, chosen with ``octavo serve --tool-call-parser NAME``."""

from __future__ import annotations

from typing import Callable

from octavo.entrypoints.openai.tool_parsers.base import (
    ParsedOutput,
    StreamPiece,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from octavo.entrypoints.openai.tool_parsers.forced import NamedToolParser, RequiredToolParser
from octavo.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from octavo.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "hermes": HermesToolParser,  # Hermes 2/3, Qwen 2.5 / 3 and others: <tool_call>{...}</tool_call>
    "llama3_json": Llama3JsonToolParser,  # Llama 3.1 / 3.2 / 3.3 JSON tool calls
}

__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "NamedToolParser",
    "ParsedOutput",
    "RequiredToolParser",
    "StreamPiece",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
]
