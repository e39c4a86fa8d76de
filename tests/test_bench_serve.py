"""``octavo bench serve`` and ``octavo bench context-sweep`` against a real ``octavo serve`` process on
loopback (tiny random model, the benchmark tokenizer), the client against a stub server with known
timings, and the metric computations on synthetic timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from octavo.benchmarks import client_overhead
from octavo.benchmarks.dummy_tokenizer import write_dummy_tokenizer
from octavo.benchmarks.offline_baseline import compare
from octavo.benchmarks.serve import (
    LoadRun,
    RequestResult,
    arrival_times,
    chunk_text,
    error_message,
    event_data,
    latency_stats,
    summarize,
)
from octavo.benchmarks.workloads import WORKLOADS, build_requests
from octavo.entrypoints.cli import main as cli

pytest.importorskip("aiohttp")
pytest.importorskip("matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256  # the tiny models' vocabulary (conftest)
MAX_MODEL_LEN = 512  # and their max_position_embeddings
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tiny_model_factory, tmp_path_factory) -> Path:
    source, _ = tiny_model_factory("llama")
    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(source, folder)
    return write_dummy_tokenizer(folder, VOCAB, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    """``octavo serve`` in its own process, as a user starts it; yields its base URL."""
    port = client_overhead.free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "octavo.entrypoints.cli", "serve", str(model_folder), "--device", "cpu",
             "--dtype", "float32", "--port", str(port), "--kv-cache-memory", "16MiB", "--served-model-name", "tiny",
             "--log-level", "warning"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"octavo serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=60)


def _bench(url: str, *flags: str) -> list[str]:
    return ["bench", "serve", "--base-url", url, "--vocab-size", str(VOCAB), "--num-warmups", "1", *flags]


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory) -> tuple[Path, dict, int]:
    """One sweep at rate inf and at 40 req/s: (JSON path, report, exit status)."""
    output = tmp_path_factory.mktemp("sweep") / "serve.json"
    status = cli(_bench(server, "--num-prompts", "6", "--prompt-len-range", "8", "40", "--output-len-range", "4",
                        "12", "--sweep-rates", "inf,40", "--output", str(output)))
    return output, json.loads(output.read_text()), status


def test_bench_serve_at_inf_and_a_finite_rate(sweep):
    output, report, status = sweep
    assert status == 0
    assert report["meta"]["model"] == "tiny" and report["meta"]["max_model_len"] == MAX_MODEL_LEN
    spec = WORKLOADS["fixed"].with_overrides(6, (8, 40), (4, 12))
    assert [run["request_rate"] for run in report["runs"]] == ["inf", "40"]
    for index, run in enumerate(report["runs"]):
        requests = build_requests(spec, VOCAB, seed=index)  # each rate has its own prompts
        assert run["seed"] == index
        assert (run["completed"], run["failed"], run["wrong_output_len"]) == (6, 0, 0)
        assert run["token_counts_from"] == "usage"
        assert run["output_tokens"] == sum(r.output_len for r in requests)
        assert run["prompt_tokens"] == sum(r.prompt_len for r in requests)
        for request, sent in zip(run["requests"], requests):
            assert request["output_tokens"] == sent.output_len and request["prompt_tokens"] == sent.prompt_len
            assert 0 < request["ttft_s"] <= request["e2el_s"]
            assert 1 <= request["chunks"] <= request["output_tokens"]
        assert run["duration_s"] >= max(r["e2el_s"] for r in run["requests"])
        assert run["request_throughput"] == pytest.approx(6 / run["duration_s"])
        assert run["output_throughput"] == pytest.approx(run["output_tokens"] / run["duration_s"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(run[key]) == {"mean", "median", "p99"}
        assert run["ttft_ms"]["median"] <= run["e2el_ms"]["median"]
        assert run["client"]["chunks"] == sum(r["chunks"] for r in run["requests"])
    finite = report["runs"][1]["requests"]
    sent_at = [r["sent_at_s"] for r in finite]
    assert sent_at == arrival_times(6, 40.0, seed=1) and sent_at == sorted(sent_at) and sent_at[-1] > 0
    assert report["runs"][1]["duration_s"] >= sent_at[-1]
    assert Path(report["plot"]) == output.with_suffix(".png")
    assert output.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_offline_baseline_runs_the_same_requests(sweep, model_folder, tmp_path):
    output, _, _ = sweep
    result = tmp_path / "offline.json"
    subprocess.run([sys.executable, "-m", "octavo.benchmarks.offline_baseline", str(output), "--model",
                    str(model_folder), "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "16MiB",
                    "--output", str(result)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   cwd=REPO_ROOT, capture_output=True)
    data = json.loads(result.read_text())
    offline = data["offline"]["0"]
    assert offline["num_requests"] == 6 and offline["detokenized"]
    spec = WORKLOADS["fixed"].with_overrides(6, (8, 40), (4, 12))
    assert offline["output_tokens"] == sum(r.output_len for r in build_requests(spec, VOCAB, seed=0))
    inf, finite = data["comparison"]
    assert inf["served_over_offline"] == pytest.approx(inf["served_output_throughput"] / offline["output_throughput"])
    assert finite["served_over_offline"] is None  # a finite rate caps throughput: no ratio


def test_bench_serve_text_prompts_and_chat(server, tmp_path):
    output = tmp_path / "text.json"
    flags = ["--num-prompts", "3", "--prompt-len-range", "8", "24", "--output-len-range", "5", "5"]
    # Completions with the ids turned into text by the server's /detokenize: the benchmark tokenizer
    # encodes the text back to exactly the same number of tokens.
    assert cli(_bench(server, *flags, "--prompt-format", "text", "--max-concurrency", "2", "--output",
                      str(output))) == 0
    (run,) = json.loads(output.read_text())["runs"]
    assert run["max_concurrency"] == 2 and run["completed"] == 3
    assert all(r["prompt_tokens"] == r["prompt_len"] and r["output_tokens"] == 5 for r in run["requests"])
    # Chat: the template adds the same few tokens to every prompt.
    assert cli(_bench(server, *flags, "--endpoint", "chat", "--output", str(output))) == 0
    report = json.loads(output.read_text())
    assert report["meta"]["endpoint"] == "/v1/chat/completions" and report["meta"]["prompt_format"] == "text"
    (run,) = report["runs"]
    assert run["completed"] == 3 and run["wrong_output_len"] == 0
    assert len({r["prompt_tokens"] - r["prompt_len"] for r in run["requests"]}) == 1
    assert all(0 < r["ttft_s"] <= r["e2el_s"] for r in run["requests"])


def test_bench_serve_reports_failures(server, tmp_path, capsys):
    output = tmp_path / "failed.json"
    status = cli(_bench(server, "--num-prompts", "3", "--prompt-len-range", "600", "700", "--output-len-range", "4",
                        "4", "--num-warmups", "0", "--output", str(output)))
    assert status == 1
    (run,) = json.loads(output.read_text())["runs"]
    assert (run["completed"], run["failed"]) == (0, 3)
    assert run["errors"] and all(e.startswith("HTTP 400: ") and "maximum context length" in e for e in run["errors"])
    assert run["ttft_ms"] is None and run["output_throughput"] == 0
    assert "error: HTTP 400" in capsys.readouterr().out


def test_context_sweep_stops_at_the_400_and_the_server_still_serves(server, tmp_path):
    output = tmp_path / "context.json"
    status = cli(["bench", "context-sweep", "--base-url", server, "--vocab-size", str(VOCAB), "--step", "150",
                  "--output-len", "8", "--output", str(output)])
    report = json.loads(output.read_text())
    assert status == 0 and report["passed"]
    steps = [row for row in report["rows"] if row["kind"] == "step"]
    assert [row["prompt_tokens"] for row in steps] == [150, 300, 450, 600]
    assert all(row["ok"] and row["generated_tokens"] == 8 for row in steps[:3])
    assert steps[3]["status"] == 400 and "maximum context length" in steps[3]["error"]
    assert report["refused_at"] == 600 and report["longest_served_prompt"] == 450
    edges = {row["kind"]: row for row in report["rows"] if row["kind"] != "step"}
    assert edges["fits"]["prompt_tokens"] == MAX_MODEL_LEN - 8 and edges["fits"]["ok"]
    assert edges["over"]["status"] == 400
    assert edges["after"]["ok"] and report["health_status"] == 200 and report["alive_after"]
    assert report["limit_at_max_model_len"] is True
    assert output.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_bad_options_get_a_clear_error(server, capsys):
    assert cli(_bench(server, "--endpoint", "chat", "--prompt-format", "ids")) == 2
    assert "--prompt-format text" in capsys.readouterr().err
    assert cli(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 2
    assert "is the server running?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["bench", "serve", "--request-rate", "0"])


# ---- the client against a stub with known timings ------------------------------------------
def test_client_overhead_against_the_stub():
    interval = 0.005
    summary = client_overhead.measure(concurrency=16, output_len=10, interval_s=interval)
    assert (summary["completed"], summary["wrong_output_len"]) == (16, 0)
    assert summary["client"]["chunks"] == 160 and summary["token_counts_from"] == "usage"
    # The stub sleeps `interval` before every chunk: no honest clock can see them closer on average.
    assert summary["itl_ms"]["mean"] >= 0.95 * interval * 1e3
    assert summary["ttft_ms"]["median"] >= interval * 1e3
    overhead = summary["overhead"]
    assert overhead["chunks_per_core_s"] > 0 and overhead["itl_excess_mean_ms"] == pytest.approx(
        summary["itl_ms"]["mean"] - interval * 1e3)


def test_chunk_counting_without_usage_and_the_chat_role_chunk():
    interval = 0.005
    summary = client_overhead.measure(concurrency=4, output_len=6, interval_s=interval, endpoint="chat",
                                      usage=False)
    assert summary["token_counts_from"] == "chunks"
    assert summary["output_tokens"] == 24 and summary["wrong_output_len"] == 0
    # The role chunk that opens a chat stream carries no text and must not count as the first token.
    assert summary["ttft_ms"]["median"] >= interval * 1e3


# ---- parsing and metrics on synthetic data ---------------------------------------------------
def test_sse_and_error_parsing():
    assert event_data(b"data: {\"a\": 1}\n") == b"{\"a\": 1}"
    assert event_data(b"data:[DONE]\n") == b"[DONE]"
    assert event_data(b": keep-alive\n") is None and event_data(b"\n") is None and event_data(b"event: x\n") is None
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    assert chunk_text(role, "chat") == ("", False)
    assert chunk_text({"choices": [{"delta": {"content": "hi"}, "finish_reason": "length"}]}, "chat") == ("hi", True)
    assert chunk_text({"choices": [{"text": " a", "finish_reason": None}]}, "completions") == (" a", False)
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, "completions") == ("", False)
    assert error_message(400, '{"error": {"message": "too long", "type": "x"}}') == "HTTP 400: too long"
    assert error_message(400, '{"object": "error", "message": "old vllm"}') == "HTTP 400: old vllm"
    assert error_message(502, "<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"


def _result(ttft: float, e2e: float, itl: list[float], tokens: int, expected: int | None = None,
            **fields) -> RequestResult:
    return RequestResult(prompt_len=10, expected_output_len=tokens if expected is None else expected, success=True,
                         ttft=ttft, e2e=e2e, itl=itl, chunks=len(itl) + 1, output_tokens=tokens, prompt_tokens=10,
                         tokens_from_usage=True, streamed_text=True, **fields)


def test_summarize_synthetic_timings():
    results = [
        _result(0.1, 1.1, [0.25] * 4, 5),  # TPOT (1.1 - 0.1) / 4 = 0.25
        _result(0.2, 0.6, [0.1, 0.3], 3),  # TPOT 0.2
        _result(0.3, 0.3, [], 1, expected=2),  # one token: no TPOT, and one fewer than asked
        RequestResult(prompt_len=10, expected_output_len=4, error="HTTP 503: overloaded", e2e=0.01),
        RequestResult(prompt_len=10, expected_output_len=4, error="HTTP 503: overloaded", e2e=0.02),
    ]
    summary = summarize(LoadRun(float("inf"), None, 0, results, duration_s=2.0, client_cpu_s=0.5))
    assert (summary["completed"], summary["failed"], summary["errors"]) == (3, 2, ["HTTP 503: overloaded"])
    assert summary["request_rate"] == "inf"
    assert summary["output_tokens"] == 9 and summary["prompt_tokens"] == 30
    assert summary["wrong_output_len"] == 1 and summary["wrong_output_len_examples"] == [(1, 2)]
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["output_throughput"] == pytest.approx(4.5)
    assert summary["total_throughput"] == pytest.approx(19.5)
    assert summary["ttft_ms"] == pytest.approx({"mean": 200.0, "median": 200.0, "p99": 298.0})
    assert summary["tpot_ms"] == pytest.approx({"mean": 225.0, "median": 225.0, "p99": 249.5})
    itl = [250.0] * 4 + [100.0, 300.0]
    assert summary["itl_ms"] == pytest.approx({"mean": np.mean(itl), "median": 250.0,
                                               "p99": float(np.percentile(itl, 99))})
    assert summary["e2el_ms"]["median"] == pytest.approx(600.0)
    assert summary["client"]["chunks"] == 5 + 3 + 1 and summary["client"]["busy_fraction"] == pytest.approx(0.25)
    assert latency_stats([]) is None


def test_arrivals_are_poisson_and_seeded():
    assert arrival_times(5, float("inf"), seed=0) == [0.0] * 5
    times = arrival_times(4000, 20.0, seed=3)
    assert times == arrival_times(4000, 20.0, seed=3) != arrival_times(4000, 20.0, seed=4)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.08)
    assert gaps.std() == pytest.approx(1 / 20.0, rel=0.1)  # exponential gaps: std equals the mean


def test_offline_comparison_rows():
    served = {"runs": [
        {"request_rate": "inf", "seed": 0, "failed": 0, "request_throughput": 4.0, "output_throughput": 900.0,
         "tpot_ms": {"median": 5.0}, "ttft_ms": {"p99": 80.0}},
        {"request_rate": "16", "seed": 1, "failed": 1, "request_throughput": 3.0, "output_throughput": 500.0,
         "tpot_ms": None, "ttft_ms": None},
    ]}
    inf, finite = compare(served, {0: {"output_throughput": 1000.0}})
    assert inf["served_over_offline"] == pytest.approx(0.9) and inf["median_tpot_ms"] == 5.0
    assert finite["served_over_offline"] is None and finite["p99_ttft_ms"] is None


def test_benchmark_tokenizer_round_trips_every_word(tmp_path):
    from transformers import AutoTokenizer

    write_dummy_tokenizer(tmp_path, 300, bos_token_id=1, eos_token_id=2)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = list(range(4, 300))
    assert tokenizer.decode(ids) == " ".join(f"w{i}" for i in ids)
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "w7 w8"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    assert list(chat) == [3, 0, 7, 8, 2, 3, 0]  # <|im_start|> user w7 w8 <|im_end|> <|im_start|> assistant
    with pytest.raises(ValueError, match="distinct"):
        write_dummy_tokenizer(tmp_path, 300, bos_token_id=2, eos_token_id=2)
