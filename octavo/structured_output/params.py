"""What a request's output must match: vLLM's ``StructuredOutputsParams``.

Plain data only (strings, lists, dicts, booleans), so it travels between processes as it is.
Exactly one constraint is set; each is checked when constructed by parsing it with the grammar
engine (no tokenizer needed), so a malformed schema, regex or grammar fails with a ValueError
naming its field before any request is queued.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from octavo.structured_output.backend import load_xgrammar

_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """One of: ``json`` (a JSON schema, dict or string), ``regex``, ``choice`` (a list of strings,
    the output is exactly one of them), ``grammar`` (EBNF, xgrammar's dialect of GBNF) or
    ``json_object=True`` (any JSON object). JSON may hold free whitespace between its tokens, at
    most 16 characters in a row; ``disable_any_whitespace`` makes it one line with ", " and ": "
    separators instead."""

    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        chosen = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(_CONSTRAINTS)}, got "
                f"{', '.join(chosen) if chosen else 'none'}."
            )
        if self.choice is not None:
            if isinstance(self.choice, tuple):
                self.choice = list(self.choice)
            if not isinstance(self.choice, list) or not self.choice or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}.")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (a dict or a JSON string), "
                             f"got {type(self.json).__name__}.")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}.")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be true or false, "
                             f"got {self.disable_any_whitespace!r}.")
        self._check_parses(chosen[0])

    @classmethod
    def from_value(cls, value: Union["StructuredOutputsParams", dict[str, Any]]) -> "StructuredOutputsParams":
        """Accept the dataclass or its dict form (as sent in a request or over a socket)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, "
                             f"got {type(value).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs has unknown keys: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))}).")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def schema_text(self) -> Optional[str]:
        """The JSON schema as compact text, the key it is compiled and cached by (keys keep their
        order: it is the order the properties are generated in)."""
        if self.json is None:
            return None
        schema = json.loads(self.json) if isinstance(self.json, str) else self.json
        return json.dumps(schema, separators=(",", ":"))

    def choice_ebnf(self) -> str:
        """The choice as an EBNF alternation of literals (JSON string escapes are valid EBNF ones)."""
        return "root ::= " + " | ".join(json.dumps(option) for option in self.choice)

    def cache_key(self) -> tuple:
        kind = self.kind
        if kind == "json":
            return (kind, self.schema_text, self.disable_any_whitespace)
        if kind == "choice":
            return (kind, tuple(self.choice))
        if kind == "json_object":
            return (kind, self.disable_any_whitespace)
        return (kind, getattr(self, kind))

    def _check_parses(self, kind: str) -> None:
        load_xgrammar()  # the install hint, even for a constraint checked before
        if kind == "json_object":
            return
        if kind == "json":
            try:
                source = self.schema_text
            except ValueError as error:  # a JSON string that does not parse
                raise ValueError(f"structured_outputs.json is invalid: {error}") from None
        else:
            source = self.choice_ebnf() if kind == "choice" else getattr(self, kind)
        detail = _parse_error(kind, source)
        if detail is not None:
            raise ValueError(f"structured_outputs.{kind} is invalid: {detail}")


# Requests tend to repeat one constraint, and the engine core checks each again on arrival.
@functools.lru_cache(maxsize=256)
def _parse_error(kind: str, source: str) -> Optional[str]:
    """What the grammar engine says is wrong with ``source`` (a JSON schema's text, a regex or
    EBNF), or None when it parses."""
    xgr = load_xgrammar()
    parse = {"json": xgr.Grammar.from_json_schema, "regex": xgr.Grammar.from_regex}.get(kind, xgr.Grammar.from_ebnf)
    try:
        parse(source)
    except (RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())
        # xgrammar prefixes its messages with a timestamp and a source location.
        return detail.split(": ", 1)[-1] if ".cc:" in detail else detail
    return None
