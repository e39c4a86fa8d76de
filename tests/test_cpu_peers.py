"""vLLM and llama.cpp as benchmark peers: chosen per interpreter, reported when they are missing."""

from __future__ import annotations

import json
import sys

import pytest

from octavo.benchmarks.cpu_batch import agreement
from octavo.benchmarks.cpu_peers import PEER_ENGINES, parse_peer_pythons, peer_environment, peer_importable


def test_peer_pythons_per_engine_or_for_all():
    assert parse_peer_pythons([], "/py") == dict.fromkeys(PEER_ENGINES, "/py")
    assert parse_peer_pythons(["/venv/bin/python"], "/py") == dict.fromkeys(PEER_ENGINES, "/venv/bin/python")
    assert parse_peer_pythons(["vllm=/a", "llama.cpp=/b"], "/py") == {"vllm": "/a", "llama.cpp": "/b"}
    with pytest.raises(ValueError, match="must be one of"):
        parse_peer_pythons(["sglang=/c"], "/py")


def test_vllm_child_runs_on_the_cpu_backend_with_every_thread():
    env = peer_environment("vllm", 2)
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_a_missing_peer_is_reported_and_octavo_still_runs(tiny_model_factory, tmp_path, capsys):
    from octavo.entrypoints.cli import main

    if peer_importable("vllm", sys.executable) is None:
        pytest.skip("vllm is importable here")
    folder, _ = tiny_model_factory("llama")
    output = tmp_path / "results.json"
    status = main(["bench", "throughput", "--model", str(folder), "--num-prompts", "2", "--prompt-len-range", "5", "9",
                   "--output-len-range", "4", "4", "--compare", "vllm,llama.cpp", "--device", "cpu", "--skip-limit",
                   "--output", str(output)])
    assert status == 1
    report = json.loads(output.read_text())
    assert "--peer-python" in report["failed"]["vllm"]
    assert "llama.cpp" in report["failed"] and [e["engine"] for e in report["engines"]] == ["octavo"]
    assert "vllm: FAILED" in capsys.readouterr().out


def test_greedy_agreement_counts_identical_requests_and_common_prefixes():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert agreement(reference, reference) == {"identical": 1.0, "common_prefix": 1.0}
    assert agreement([[1, 2, 9, 9], [5, 6, 7, 8]], reference) == {"identical": 0.5, "common_prefix": 0.75}
