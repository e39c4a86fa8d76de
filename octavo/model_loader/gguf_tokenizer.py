"""Build a Hugging Face fast tokenizer from the vocabulary stored in a GGUF file.

A GGUF has no ``tokenizer.json``: llama.cpp keeps the tokens, their types, the BPE merges (or
SentencePiece scores) and the special-token ids as metadata, plus a name for the pre-tokenizer
(``tokenizer.ggml.pre``) whose regexes live in llama.cpp's source. We rebuild the equivalent
``tokenizers.Tokenizer`` so that text is split the way llama.cpp (and the original model's
tokenizer) splits it, and wrap it in ``PreTrainedTokenizerFast`` with the chat template.

Supported vocabularies:

* ``gpt2`` - byte-level BPE (SmolLM, Qwen2/3, Llama 3, GPT-2, ...);
* ``llama`` - SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, TinyLlama, ...).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from gguf.constants import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from octavo.model_loader.gguf_loader import GGUFHeader, read_gguf_header

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_PRE_TOKENIZERS", "load_gguf_tokenizer"]

# --------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, by llama.cpp's `tokenizer.ggml.pre` name. Each entry is the list of
# regexes llama.cpp applies one after another (every piece of one split is split again by the
# next), which is exactly a sequence of `Split(..., "isolated")` pre-tokenizers.
# --------------------------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek's hand-written classes, as llama.cpp copies them from the models' tokenizer.json.
# Escaped on purpose: U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126 and U+212A have canonical
# look-alikes that an editor or NFC normalization would silently substitute.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_PUNCT = "!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002"
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # ideographs, U+0800-U+4E00, Hangul
_DEEPSEEK3_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"  # CJK ideographs, kana
_DEEPSEEK3 = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_FAMILIES: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2,),
    "digits": (r"\p{N}", _GPT2),  # starcoder-style: every digit on its own
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "gpt4o": (_GPT4O,),
    "tekken": (_TEKKEN,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-llm": (r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", rf"\s?[{_DEEPSEEK_PUNCT}]+", r"\s+$",
                     _DEEPSEEK_CJK, r"\p{N}+"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    "deepseek3": (r"\p{N}{1,3}", _DEEPSEEK3_CJK, _DEEPSEEK3),
    # llama.cpp's fallback for files with no (or the "default") pre-tokenizer name
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
}

_PRE_NAMES: dict[str, str] = {
    **dict.fromkeys(
        ["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling",
         "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
         "gigachat", "a.x-4.0", "mellum"],
        "gpt2",
    ),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
         "mellum2"],
        "digits",
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "dbrx", "smaug-bpe", "chatglm-bpe"],
        "llama3",
    ),
    **dict.fromkeys(
        ["qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"],
        "qwen2",
    ),
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], "gpt4o"),
    "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder",
    "deepseek-v3": "deepseek3",
    "tekken": "tekken",
    "falcon": "falcon",
    "default": "default",
}

SUPPORTED_PRE_TOKENIZERS: tuple[str, ...] = tuple(sorted(_PRE_NAMES))

# llama.cpp merges a whole pre-token that is itself a vocabulary entry without running BPE for
# these (Llama 3's tokenizer.json says "ignore_merges": true).
_IGNORE_MERGES = {"llama3"}
# Qwen2's original tokenizer.json normalizes to NFC before splitting.
_NFC = {"qwen2"}


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    regexes = _PRE_FAMILIES[family]
    if regexes == (_GPT2,):
        # ByteLevel's built-in regex is exactly GPT-2's
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _pre_family(pre: str | None) -> str:
    if pre is None:
        logger.warning(
            "GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer "
            "(llama.cpp warns that generation quality may be degraded for such files)."
        )
        return "default"
    family = _PRE_NAMES.get(pre)
    if family is None:
        logger.warning(
            "GGUF pre-tokenizer %r is not known here; splitting text like GPT-2 instead. "
            "Tokenization may differ from llama.cpp. Known: %s",
            pre,
            ", ".join(SUPPORTED_PRE_TOKENIZERS),
        )
        return "gpt2"
    return family


# --------------------------------------------------------------------------------------------
# Vocabulary builders
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS.values())


def _token_types(md: dict[str, Any], n: int) -> np.ndarray:
    types = md.get("tokenizer.ggml.token_type")
    if types is None:
        return np.full(n, TokenType.NORMAL, dtype=np.int32)
    return np.asarray(types, dtype=np.int32)


def _split_merge(merge: str) -> tuple[str, str] | None:
    # like llama.cpp: the separator is the first space after the first character
    pos = merge.find(" ", 1)
    if pos < 0:
        return None
    return merge[:pos], merge[pos + 1 :]


def _byte_level_bpe(md: dict[str, Any], family: str) -> tuple[Tokenizer, list[AddedToken]]:
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = _token_types(md, len(tokens))
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (tok, ttype) in enumerate(zip(tokens, types.tolist())):
        is_byte_level = set(tok) <= _BYTE_ALPHABET
        if ttype == TokenType.CONTROL or (ttype == TokenType.USER_DEFINED and is_byte_level):
            # matched whole in the text before BPE runs, as llama.cpp does; special tokens
            # also bypass the byte-level decoder, so any spelling is fine for them
            added.append(
                AddedToken(tok, special=ttype == TokenType.CONTROL, normalized=False)
            )
        elif not is_byte_level:
            # a raw-text entry (e.g. a user-defined token with non-Latin-1 characters): spell
            # it in the byte alphabet so BPE can reach it and the decoder can print it
            tok = "".join(_BYTE_CHARS[b] for b in tok.encode("utf-8"))
        if tok in vocab:
            logger.debug("duplicate GGUF token %r at id %d (first at %d)", tok, i, vocab[tok])
            continue
        vocab[tok] = i
    merges: list[tuple[str, str]] = []
    dropped = 0
    for m in md.get("tokenizer.ggml.merges", []):
        pair = _split_merge(m)
        if pair is None or any(p not in vocab for p in (*pair, "".join(pair))):
            dropped += 1
            continue
        merges.append(pair)
    if dropped:
        logger.debug("dropped %d merges whose parts or result are not in the vocabulary", dropped)
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        ignore_merges=family in _IGNORE_MERGES,
        fuse_unk=False,
        byte_fallback=False,
    )
    tk = Tokenizer(model)
    if family in _NFC:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = _pre_tokenizer(family)
    tk.decoder = decoders.ByteLevel()
    return tk, added


def _sentencepiece_merges(vocab: dict[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's greedy "merge the best-scoring pair" rule.

    Every split of every piece into two in-vocabulary parts is a merge; merges producing a
    higher-scoring piece go first (ties: lower ids first).
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            lid, rid = vocab.get(left), vocab.get(right)
            if lid is not None and rid is not None:
                ranked.append((-float(scores[pid]), lid, rid, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_bpe(md: dict[str, Any]) -> tuple[Tokenizer, list[AddedToken]]:
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = _token_types(md, len(tokens))
    scores = md.get("tokenizer.ggml.scores")
    scores = (
        np.asarray(scores, dtype=np.float64)
        if scores is not None
        else -np.arange(len(tokens), dtype=np.float64)
    )
    unk_id = md.get("tokenizer.ggml.unknown_token_id", 0)
    vocab: dict[str, int] = {}
    mergeable: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (tok, ttype) in enumerate(zip(tokens, types.tolist())):
        if tok in vocab:
            continue
        vocab[tok] = i
        if ttype in (TokenType.NORMAL, TokenType.USER_DEFINED):
            mergeable[tok] = i
        if ttype == TokenType.CONTROL:
            added.append(AddedToken(tok, special=True, normalized=False))
        elif ttype == TokenType.USER_DEFINED:
            added.append(AddedToken(tok, special=False, normalized=False))
    unk = tokens[int(unk_id)] if unk_id is not None and int(unk_id) < len(tokens) else None
    model = models.BPE(
        vocab=vocab,
        merges=_sentencepiece_merges(mergeable, scores),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tk = Tokenizer(model)
    add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp puts the space before the text and after every special token, i.e. before each
    # piece of plain text, which is what a normalizer does (it runs per non-special segment)
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
    if add_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(steps)
    dec: list[decoders.Decoder] = [
        decoders.Replace("\u2581", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    return tk, added


# --------------------------------------------------------------------------------------------
# Special tokens, post-processing, wrapping
# --------------------------------------------------------------------------------------------


def _token(md: dict[str, Any], key: str) -> tuple[int, str] | None:
    tid = md.get(f"tokenizer.ggml.{key}")
    tokens = md["tokenizer.ggml.tokens"]
    if tid is None or not 0 <= int(tid) < len(tokens):
        return None
    return int(tid), tokens[int(tid)]


def _post_processor(md: dict[str, Any], kind: str, family: str | None) -> TemplateProcessing | None:
    # llama.cpp's defaults when the file does not say: BOS for SentencePiece and Llama 3 vocabs
    default_bos = kind == "llama" or family == "llama3"
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = _token(md, "bos_token_id"), _token(md, "eos_token_id")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if not (add_bos or add_eos):
        return None
    def seq(piece: str, type_id: int) -> list[str]:
        out = [f"{bos[1]}:{type_id}"] if add_bos else []
        out.append(f"{piece}:{type_id}")
        if add_eos:
            out.append(f"{eos[1]}:{type_id}")
        return out

    special = ([bos] if add_bos else []) + ([eos] if add_eos else [])
    special = [(text, tid) for tid, text in dict.fromkeys(special)]
    single, pair = seq("$A", 0), seq("$A", 0) + seq("$B", 1)
    return TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _chat_template(md: dict[str, Any]) -> str | dict[str, str] | None:
    main = md.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {
        k[len(prefix) :]: v for k, v in md.items() if k.startswith(prefix) and isinstance(v, str)
    }
    if not named:
        return main
    if main is not None:
        named = {"default": main, **named}
    return named


def _build(header: GGUFHeader) -> PreTrainedTokenizerFast:
    md = header.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in md:
        raise ValueError(
            f"{header.path} has no tokenizer metadata; load a tokenizer separately "
            "(e.g. from the original Hugging Face repository)."
        )
    family: str | None = None
    if kind == "gpt2":
        family = _pre_family(md.get("tokenizer.ggml.pre"))
        backend, added = _byte_level_bpe(md, family)
    elif kind == "llama":
        backend, added = _sentencepiece_bpe(md)
    else:
        raise ValueError(
            f"{header.path}: GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece). Load the tokenizer from the "
            "original Hugging Face repository instead."
        )
    special = [t for t in added if t.special]
    plain = [t for t in added if not t.special]
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)
    post = _post_processor(md, kind, family)
    if post is not None:
        backend.post_processor = post

    bos, unk = _token(md, "bos_token_id"), _token(md, "unknown_token_id")
    pad = _token(md, "padding_token_id")
    # generation should stop at the end-of-turn token when the file names one
    eos = _token(md, "eot_token_id") or _token(md, "eos_token_id")
    ctx = header.metadata.get(f"{md.get('general.architecture')}.context_length")
    kwargs: dict[str, Any] = {
        "tokenizer_object": backend,
        "bos_token": bos[1] if bos else None,
        "eos_token": eos[1] if eos else None,
        "unk_token": unk[1] if unk else None,
        "pad_token": pad[1] if pad else None,
        "clean_up_tokenization_spaces": False,
    }
    if ctx:
        kwargs["model_max_length"] = int(ctx)
    template = _chat_template(md)
    if template is not None:
        kwargs["chat_template"] = template
    tok = PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})
    n_vocab = len(md["tokenizer.ggml.tokens"])
    if len(tok) != n_vocab:
        logger.warning(
            "%s: tokenizer has %d entries but the GGUF lists %d tokens (duplicate entries?)",
            header.path, len(tok), n_vocab,
        )
    return tok


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The file's tokenizer as a ``PreTrainedTokenizerFast``, with its chat template.

    ``eos_token`` is the end-of-turn token when the file names one
    (``tokenizer.ggml.eot_token_id``), otherwise the file's eos, so that chat generation stops
    where the template ends a turn.
    """
    return _build(read_gguf_header(path))
