"""The ``octavo`` command line before any model loads: every flag documented with its default,
bad values and an unusable port refused at once, and one ``--log-level`` before or after the
command."""

from __future__ import annotations

import argparse
import socket

import pytest

from octavo.entrypoints import cli
from octavo.entrypoints.openai import server as server_module


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("octavo.llm.LLM", never)
    monkeypatch.setattr(server_module, "AsyncLLMEngine", never)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "hi", "--max-tokens", "-1"], "--max-tokens"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--temperature", "-0.5"], "--temperature"),
    (["chat", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--dtype", "float64"], "--dtype"),
    (["generate", "hi", "--device", "tpu"], "--device"),
    (["generate", "hi", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["generate", "hi", "--load-format", "pickle"], "--load-format"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["serve", "--log-level", "loud"], "--log-level"),
])
def test_bad_flags_are_refused_before_the_model_loads(no_model_loading, capsys, argv, flag):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err, err


def test_sampling_checks_run_before_the_model_loads(no_model_loading, capsys):
    assert cli.main(["generate", "hi", "--top-k", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: top_k") and "Traceback" not in err, err


def test_port_in_use_is_found_before_the_model_loads(no_model_loading, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port), "--load-format", "dummy"]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "already in use" in err and "--port" in err, err


def test_unknown_host_is_found_before_the_model_loads(no_model_loading, capsys):
    assert cli.main(["serve", "--host", "no-such-host.invalid"]) == 2
    assert "--host" in capsys.readouterr().err


@pytest.mark.parametrize("argv, level", [
    (["generate", "hi"], "warning"),
    (["serve"], "info"),
    (["--log-level", "DEBUG", "generate", "hi"], "debug"),
    (["generate", "hi", "--log-level", "error"], "error"),
    (["--log-level", "debug", "serve"], "debug"),
    (["serve", "--log-level", "warning"], "warning"),
    (["--log-level", "debug", "chat", "--log-level", "info"], "info"),  # the later one wins
])
def test_one_log_level_flag_before_or_after_the_command(argv, level):
    assert cli.parse_args(argv).log_level == level


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"octavo": parser} | {name: subparsers.choices[name] for name in ("generate", "chat", "serve")}


@pytest.mark.parametrize("command", ["octavo", "generate", "chat", "serve"])
def test_every_flag_has_help_and_shows_its_default(command):
    parser = _commands()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name} has no help text"
        if not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in shown, f"{command} {name} does not show its default ({action.default!r})"
    parser.format_help()  # every %(default)s expands
