"""The engine core in its own process, seen from the offline front end: loud failure, no hang."""

from __future__ import annotations

import os
import signal
import time

import pytest

from octavo import LLM, SamplingParams
from octavo.engine.core_client import EngineDeadError


def test_a_core_killed_while_idle_fails_the_next_call(tiny_model_factory):
    """A send to a core that is gone must not block (a PUSH socket without a peer would)."""
    folder, _ = tiny_model_factory("llama")
    llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=64, engine_core_process=True)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7]}
    assert len(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    process = llm.llm_engine.core_client.process
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="exited with code -9"):
        llm.generate(prompt, params, use_tqdm=False)
    assert time.monotonic() - started < 10
    with pytest.raises(EngineDeadError):  # and stays dead, without hanging either
        llm.generate(prompt, params, use_tqdm=False)
