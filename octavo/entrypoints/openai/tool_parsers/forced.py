"""Outputs whose shape the grammar enforced: ``tool_choice`` naming a function (the output is
its arguments object) or ``"required"`` (a JSON array of ``{"name", "parameters"}``)."""

from __future__ import annotations

from octavo.entrypoints.openai.tool_parsers.base import (
    StreamPiece,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    call_from_json,
)
from octavo.entrypoints.openai.tool_parsers.llama3_json import decode_objects


class NamedToolParser(ToolParser):
    """The whole output is the named function's arguments; streamed as they are generated."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.call = ToolCall(name, "")

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.call.arguments = text
        return "", [self.call]

    def stream(self, delta: str) -> StreamPiece:
        first = self._calls_sent == 0
        self._calls_sent = 1
        self._text += delta
        if not first and not delta:
            return StreamPiece()
        return StreamPiece(tool_calls=[ToolCallDelta(0, delta, self.call.id if first else None,
                                                     self.call.name if first else None)])

    def finish(self) -> StreamPiece:
        return self.stream("") if self._calls_sent == 0 else StreamPiece()


class RequiredToolParser(ToolParser):
    def __init__(self) -> None:
        super().__init__()
        self._calls: list[ToolCall] = []

    def scan(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        start = text.find("[")
        values = decode_objects(text[start + 1:], ",")[0] if start >= 0 else []
        calls = [call for call in map(call_from_json, values) if call is not None]
        self._calls += calls[len(self._calls):]
        return "", self._calls[: len(calls)]
