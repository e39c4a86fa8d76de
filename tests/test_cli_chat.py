"""The ``octavo`` CLI on a tiny GGUF model: chat sessions driven through a fake stdin, streaming
generation, and one-line errors (exit status 2) for models it cannot load."""

from __future__ import annotations

import io
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from octavo.engine.engine import LLMEngine, RequestState
from octavo.entrypoints import cli
from octavo.model_loader.gguf_tokenizer import load_gguf_tokenizer
from tests.test_gguf import _tiny, write_model_gguf

ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A random llama GGUF with a ChatML template, saved as ``.bin``: GGUF is found by its magic."""
    return write_model_gguf(tmp_path_factory.mktemp("cli") / "tiny-llama.bin", "llama", _tiny("llama"))


class Recorder(io.StringIO):
    """A stdout that keeps every ``write``, to tell streamed output from one final write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def fake_input(monkeypatch, lines: list) -> None:
    """Answer ``input()`` with ``lines`` in turn; an exception class in the list is raised instead."""
    pending = iter(lines)

    def answer(prompt: str = "") -> str:
        print(prompt, end="")
        line = next(pending, None)
        if line is None:
            raise AssertionError("the chat asked for more input than the test gives")
        if isinstance(line, type) and issubclass(line, BaseException):
            raise line
        print(line)
        return line

    monkeypatch.setattr("builtins.input", answer)


@dataclass
class Turns:
    """What each chat turn sent to the engine and got back."""

    prompts: list[str] = field(default_factory=list)  # the prompt tokens, decoded
    replies: list[str] = field(default_factory=list)
    states: list[RequestState] = field(default_factory=list)
    engine: LLMEngine | None = None


def record_turns(monkeypatch) -> Turns:
    turns = Turns()
    add_request = LLMEngine.add_request
    stream_completion = cli.stream_completion

    def recording_add_request(self, request_id, prompt, *args, **kwargs):
        turns.engine = self
        turns.prompts.append(self.tokenizer.decode(prompt["prompt_token_ids"]))
        add_request(self, request_id, prompt, *args, **kwargs)
        turns.states.append(self.outputs.requests[self._ids[request_id]])

    def recording_stream_completion(*args, **kwargs) -> str:
        turns.replies.append(stream_completion(*args, **kwargs))
        return turns.replies[-1]

    monkeypatch.setattr(LLMEngine, "add_request", recording_add_request)
    monkeypatch.setattr(cli, "stream_completion", recording_stream_completion)
    return turns


def turn(user: str, reply: str = "") -> str:
    """One exchange in the test template (ChatML); an empty reply is the generation prompt."""
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return text + f"{reply}<|im_end|>\n" if reply else text


def test_chat_keeps_history_resets_and_exits(tiny_gguf, monkeypatch, capsys):
    # Ctrl-C at the empty prompt only asks again; /exit ends the session
    fake_input(monkeypatch, [KeyboardInterrupt, "What is octavo?", "And then?", "/reset", "Fresh start", "/exit"])
    turns = record_turns(monkeypatch)
    assert cli.main(["chat", "--model", str(tiny_gguf), *ENGINE_FLAGS, "--max-tokens", "4"]) == 0
    assert len(turns.replies) == 3 and all(turns.replies), turns.replies
    assert turns.prompts == [
        turn("What is octavo?"),
        turn("What is octavo?", turns.replies[0]) + turn("And then?"),  # the second turn sees the first
        turn("Fresh start"),  # /reset forgot both
    ]
    assert "(history cleared)" in capsys.readouterr().out


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(tiny_gguf, monkeypatch, capsys):
    fake_input(monkeypatch, ["Tell me a story", "Go on", "/exit"])
    turns = record_turns(monkeypatch)
    step = LLMEngine.step
    steps = 0

    def step_interrupted_once(self):
        nonlocal steps
        steps += 1
        if steps == 2:  # the first reply has one token; Ctrl-C arrives before its second
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", step_interrupted_once)
    assert cli.main(["chat", "--model", str(tiny_gguf), *ENGINE_FLAGS, "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out.count(" [stopped]") == 1
    stopped, next_reply = (state.samples[0] for state in turns.states)
    assert len(stopped.token_ids) == 1 and len(next_reply.token_ids) == 6
    assert not turns.engine.has_unfinished_requests()  # the stopped request was aborted
    # the stopped reply stays in the history, as far as it got
    assert turns.prompts[1] == turn("Tell me a story", turns.replies[0]) + turn("Go on")


def test_chat_ends_at_eof(tiny_gguf, monkeypatch):
    fake_input(monkeypatch, [EOFError])
    assert cli.main(["chat", "--model", str(tiny_gguf), *ENGINE_FLAGS]) == 0


def test_chat_help_and_unknown_commands(tiny_gguf, monkeypatch, capsys):
    """Slash commands never reach the model: /help lists them, an unknown one is refused, and //
    sends a message that starts with a slash."""
    fake_input(monkeypatch, ["/help", "/rest", "/exit-now please", "//etc/hosts?", "/quit"])
    turns = record_turns(monkeypatch)
    assert cli.main(["chat", "--model", str(tiny_gguf), *ENGINE_FLAGS, "--max-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in cli.CHAT_COMMANDS)
    assert "unknown command /rest; /help lists the commands" in out
    assert "unknown command /exit-now" in out
    assert turns.prompts == [turn("/etc/hosts?")]


def test_generate_answers_through_the_chat_template(tiny_gguf, monkeypatch):
    """A chat model gets the prompt as a user turn and only the answer is printed; --raw
    continues the text itself, printed after it."""
    prompts: list = []
    add_request = LLMEngine.add_request

    def recording_add_request(self, request_id, prompt, *args, **kwargs):
        prompts.append(prompt)
        add_request(self, request_id, prompt, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", recording_add_request)
    args = ["generate", "Write a haiku", "--model", str(tiny_gguf), *ENGINE_FLAGS, "--max-tokens", "3"]
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(args) == 0
    engine_tokenizer = load_gguf_tokenizer(tiny_gguf)
    assert engine_tokenizer.decode(prompts[0]["prompt_token_ids"]) == turn("Write a haiku")
    assert "Write a haiku" not in stdout.getvalue()

    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main([*args, "--raw"]) == 0
    assert prompts[1] == "Write a haiku" and stdout.writes[0] == "Write a haiku"


@pytest.mark.parametrize("load_format", ["auto", "gguf"])
def test_generate_streams_from_a_gguf_named_bin(tiny_gguf, monkeypatch, load_format):
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(["generate", "Hello", "--raw", "--model", str(tiny_gguf), "--load-format", load_format,
                     *ENGINE_FLAGS, "--max-tokens", "6"]) == 0
    assert stdout.writes[0] == "Hello" and stdout.writes[-1] == "\n"
    assert len([delta for delta in stdout.writes[1:-1] if delta]) > 1  # the text arrives in pieces


def run_failing(args: list[str], capsys) -> str:
    """Run the CLI, expect exit status 2, and return its one-line error."""
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("model, load_format, message", [
    ("not-gguf.bin", "auto", "not a GGUF file"),
    ("not-gguf.bin", "gguf", "not a GGUF file"),
    ("hf-folder", "gguf", "needs a GGUF file"),
    ("gguf", "safetensors", "is a GGUF file"),
])
def test_models_that_cannot_load_give_a_one_line_error(tmp_path, tiny_gguf, tiny_model_factory, capsys,
                                                       model: str, load_format: str, message: str):
    (tmp_path / "not-gguf.bin").write_bytes(b"PK\x03\x04 a zip, say")
    paths = {"not-gguf.bin": tmp_path / "not-gguf.bin", "gguf": tiny_gguf,
             "hf-folder": tiny_model_factory("gpt2", with_tokenizer=True)[0]}
    args = ["generate", "hi", "--model", str(paths[model]), "--load-format", load_format, *ENGINE_FLAGS]
    assert message in run_failing(args, capsys)


def test_pickled_weights_need_the_opt_in_whatever_the_load_format(tmp_path, tiny_model_factory, capsys):
    import torch
    from safetensors.torch import load_file

    folder, _ = tiny_model_factory("gpt2", with_tokenizer=True)
    for item in folder.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, tmp_path / item.name)
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    args = ["generate", "hi", "--model", str(tmp_path), *ENGINE_FLAGS, "--max-tokens", "2"]
    for load_format in ("auto", "pt"):
        assert "--allow-pickle-weights" in run_failing([*args, "--load-format", load_format], capsys)
    assert cli.main([*args, "--load-format", "pt", "--allow-pickle-weights"]) == 0


def test_refused_long_prompt_logs_no_tokenizer_warning(tiny_gguf, capsys):
    """The engine's limit refuses the prompt; transformers' "sequence length is longer than the
    specified maximum" warning about the tokenizer's own limit must not be printed with it."""
    prompt = "a " * 400
    assert len(load_gguf_tokenizer(tiny_gguf).encode(prompt)) > load_gguf_tokenizer(tiny_gguf).model_max_length
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        for mode in (["--raw"], []):
            error = run_failing(["generate", prompt, *mode, "--model", str(tiny_gguf), *ENGINE_FLAGS], capsys)
            assert "128" in error
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "sequence length is longer" in r], records
