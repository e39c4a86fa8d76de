"""Incremental detokenization: streaming equals a full decode, UTF-8 held back, stop strings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from octavo.engine.detokenizer import IncrementalDetokenizer, decode_token
from octavo.sampling_params import SamplingParams

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text: café, naïve, 日本語のテキスト, emoji 😀🎉👍🏽 and more.",
    "Stop here. END of story. ### markers ### and the end",
]
TEXTS = [
    "Hello 😀🎉 world, 日本語 café. END of 👍🏽 story",
    "naïve 🎉🎉🎉 fox jumps 語語 ###",
    "The lazy dog says 😀",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE: characters outside its merges become 1-byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def stream(
    tokenizer,
    output_ids: list[int],
    params: SamplingParams,
    chunk: int = 1,
    prompt: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ``output_ids`` ``chunk`` at a time, stopping like the engine would on a stop string."""
    detok = IncrementalDetokenizer(
        tokenizer, prompt if prompt is not None else tokenizer.encode("Say:"), params
    )
    deltas, stop = [], None
    for start in range(0, len(output_ids), chunk):
        stop = detok.append(output_ids[start : start + chunk])
        if stop is not None:
            break
        deltas.append(detok.take_stream_delta(finished=False))
    deltas.append(detok.take_stream_delta(finished=True))
    return detok, deltas, stop


def test_tokenizer_splits_emoji_into_several_tokens(tokenizer) -> None:
    # Guards the premise of the UTF-8 tests below.
    assert len(tokenizer.encode("🎉")) > 1
    assert "\ufffd" in decode_token(tokenizer, tokenizer.encode("🎉")[0])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_equals_full_decode(tokenizer, text: str, chunk: int) -> None:
    ids = tokenizer.encode(text)
    detok, deltas, stop = stream(tokenizer, ids, SamplingParams(), chunk)
    assert stop is None
    assert "".join(deltas) == detok.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # Multi-byte characters come out whole.
    assert {"🎉", "😀"} & set(deltas) or chunk > 1


def test_special_tokens(tokenizer) -> None:
    ids = (
        tokenizer.encode("Hello")
        + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        + tokenizer.encode(" 😀 end")
    )
    for skip in (True, False):
        detok, deltas, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip))
        assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in detok.text


def test_prompt_ending_in_special_tokens(tokenizer) -> None:
    prompt = [tokenizer.convert_tokens_to_ids("<|im_start|>")] + tokenizer.encode("Hi") + [2, 2]
    ids = tokenizer.encode("😀 fox")
    for context in (prompt, []):
        detok, deltas, _ = stream(tokenizer, ids, SamplingParams(), prompt=context)
        assert detok.text == "".join(deltas) == "😀 fox"


def test_decode_window_stays_small(tokenizer) -> None:
    """Each token costs a decode of a few recent ids, not of the whole output."""
    ids = tokenizer.encode(" ".join(TEXTS) * 20)
    lengths: list[int] = []

    class Recording:
        added_tokens_decoder = tokenizer.added_tokens_decoder

        @staticmethod
        def decode(token_ids, skip_special_tokens):
            lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    detok, deltas, _ = stream(Recording, ids, SamplingParams(), prompt=tokenizer.encode("Say:"))
    assert detok.text == "".join(deltas) == tokenizer.decode(ids)
    assert len(ids) > 500 and max(lengths) <= 12


def test_disabled_detokenization(tokenizer) -> None:
    ids = tokenizer.encode("Stop here. END")
    for detok in (
        IncrementalDetokenizer(tokenizer, [], SamplingParams(detokenize=False, stop=["END"])),
        IncrementalDetokenizer(None, [1, 2], SamplingParams(stop=["END"])),
    ):
        assert detok.append(ids) is None
        assert detok.text == "" and detok.take_stream_delta(True) == ""


def test_decode_token(tokenizer) -> None:
    assert decode_token(tokenizer, tokenizer.encode("Hello")[0]) == tokenizer.convert_ids_to_tokens(
        tokenizer.encode("Hello")[0]
    )
    assert decode_token(tokenizer, 2) == "<|im_end|>"


# --- stop strings -----------------------------------------------------------------------

STORY = "Hello world! The quick brown fox 😀 jumps. END of story"


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize(
    ("stops", "expected_stop", "cut_before"),
    [
        (["Hello"], "Hello", ""),  # at the very start
        (["brown fox"], "brown fox", "Hello world! The quick "),  # middle, spans tokens
        (["😀"], "😀", "Hello world! The quick brown fox "),  # a multi-token character
        (["ox 😀 j"], "ox 😀 j", "Hello world! The quick brown f"),
        (["story", "quick", "END"], "quick", "Hello world! The "),  # earliest wins
        (["zzz", "."], ".", "Hello world! The quick brown fox 😀 jumps"),
        (["nothing"], None, STORY),
    ],
)
def test_stop_strings(
    tokenizer, chunk: int, stops: list[str], expected_stop: str | None, cut_before: str
) -> None:
    ids = tokenizer.encode(STORY)
    for include in (False, True):
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        detok, deltas, stop = stream(tokenizer, ids, params, chunk)
        assert stop == expected_stop
        expected = cut_before + (expected_stop if include and expected_stop else "")
        assert detok.text == expected
        assert "".join(deltas) == expected


def test_stop_string_spans_token_boundary(tokenizer) -> None:
    ids = tokenizer.encode(STORY)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert not any("brown fox" in piece for piece in pieces)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["brown fox"]))
    matched_at = next(i for i, token in enumerate(ids) if detok.append([token]) is not None)
    assert tokenizer.decode(ids[: matched_at + 1]).endswith("brown fox")
    assert detok.text == "Hello world! The quick "


def test_stream_withholds_possible_stop_prefix(tokenizer) -> None:
    text = "Stop here. END of story. ### markers ###"
    ids = tokenizer.encode(text)
    stops = ["ENDING", "### end"]
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stops))
    streamed = ""
    for token in ids:
        assert detok.append([token]) is None
        streamed += detok.take_stream_delta(finished=False)
        held = detok.text[len(streamed) :]
        assert detok.text.startswith(streamed)
        # What is held back is exactly the longest suffix that may still grow into a stop string.
        longest = max(
            (
                n
                for n in range(1, 7)
                if any(s.startswith(detok.text[-n:]) for s in stops)
                if n <= len(detok.text)
            ),
            default=0,
        )
        assert held == (detok.text[-longest:] if longest else "")
        if detok.text.endswith("EN"):
            assert held == "EN"
    assert streamed + detok.take_stream_delta(finished=True) == text


def test_stream_with_included_stop_holds_nothing_back(tokenizer) -> None:
    ids = tokenizer.encode("Stop here. END")
    detok = IncrementalDetokenizer(
        tokenizer, [], SamplingParams(stop=["ENDING"], include_stop_str_in_output=True)
    )
    detok.append(ids)
    assert detok.take_stream_delta(finished=False) == "Stop here. END"


# --- spaces between special tokens --------------------------------------------------------


def test_spaces_between_special_tokens() -> None:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = [1, 3, 4, 5, 2, 2, 1]
    with_spaces = "[CLS] hello worlds [SEP] [SEP] [CLS]"
    for flag, expected in ((True, with_spaces), (False, "[CLS] hello worlds [SEP][SEP][CLS]")):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=flag)
        detok, deltas, _ = stream(wordpiece, ids, params, prompt=[])
        assert detok.text == "".join(deltas) == expected
    assert wordpiece.decode(ids) == with_spaces
    detok, _, _ = stream(
        wordpiece, ids, SamplingParams(spaces_between_special_tokens=False), prompt=[]
    )
    assert detok.text == "hello worlds"


def test_first_token_keeps_its_leading_space_after_the_prompt() -> None:
    """SentencePiece-style decoders drop a sequence's leading space; the prompt context keeps it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    metaspace = PreTrainedTokenizerFast(tokenizer_object=tok)
    prompt, output = metaspace.encode("The quick"), metaspace.encode(" brown fox")
    assert metaspace.decode(prompt + output) == "The quick brown fox"
    detok, deltas, _ = stream(metaspace, output, SamplingParams(), prompt=prompt)
    assert detok.text == "".join(deltas) == " brown fox"
