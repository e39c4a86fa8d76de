"""The grammar engine behind structured output: xgrammar, imported only when a request needs it.

``GrammarCompiler`` turns ``StructuredOutputsParams`` into compiled grammars for one tokenizer,
on a background thread so that a new schema compiles while its prompt is prefilled, and keeps
them in a bounded cache keyed by the canonical constraint (schema text, regex, ...): 256
requests with one schema compile it once. The engine core holds no tokenizer of its own: the
compile thread loads it, once, when the first constrained request arrives.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from octavo.structured_output.params import StructuredOutputsParams

_CACHE_SIZE = 256  # compiled grammars kept; each is a few kB to a few MB
# Free whitespace allowed between two JSON tokens: room for any indentation a model would use,
# but no endless run of blanks, a loop small models fall into when whitespace is unbounded.
_MAX_JSON_WHITESPACE = 16


def load_xgrammar() -> ModuleType:
    try:
        import xgrammar
    except ImportError:
        raise ValueError(
            "structured output (structured_outputs, response_format, tool_choice required or named) needs "
            "the xgrammar package: pip install 'octavo[structured]' (or pip install xgrammar)."
        ) from None
    return xgrammar


class GrammarCompiler:
    """Compiled grammars for one tokenizer and vocabulary, cached and compiled off the step thread."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        load_xgrammar()  # fail now, with the install hint, rather than in the compile thread
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        # Built by the compile thread, as loading the tokenizer and reading a large vocabulary take
        # a while; nothing else uses that tokenizer.
        self._compiler: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="octavo-grammar")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: "StructuredOutputsParams") -> Future:
        """A future of the compiled grammar; the same future for the same constraint."""
        key = params.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, params: "StructuredOutputsParams") -> Any:
        if self._compiler is None:
            xgr = load_xgrammar()
            # vocab_size is the model's (often padded past the tokenizer's): masks must cover every logit.
            tokenizer = self._load_tokenizer()
            if tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer, and this model has none.")
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_token_ids or None)
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        compiler, kind = self._compiler, params.kind
        any_whitespace = not params.disable_any_whitespace
        if kind in ("json", "json_object"):
            schema = params.schema_text if kind == "json" else '{"type": "object"}'
            return compiler.compile_json_schema(schema, any_whitespace=any_whitespace,
                                                max_whitespace_cnt=_MAX_JSON_WHITESPACE if any_whitespace else None)
        if kind == "regex":
            return compiler.compile_regex(params.regex)
        if kind == "choice":
            return compiler.compile_grammar(params.choice_ebnf())
        return compiler.compile_grammar(params.grammar)
