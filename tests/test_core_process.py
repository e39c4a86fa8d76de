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


def test_merged_step_messages_keep_each_requests_token_order():
    """When the front end falls behind, the client merges queued step messages. A request's token
    in one step's columns must still come before its finishing output in the next step (and a
    first output before the next step's column token), through the wire format too."""
    from octavo.engine.messages import CoreOutput, SampleDelta, StepOutputs, decode_from_core, encode
    from octavo.engine.output_processor import OutputProcessor

    params = SamplingParams(max_tokens=4, detokenize=False)
    frontend = OutputProcessor(tokenizer=None)
    frontend.new_request("a", 1, None, [9, 9], params, stream=False)
    frontend.new_request("b", 2, None, [9, 9], params, stream=False)
    steps = [
        StepOutputs([CoreOutput(1, [SampleDelta(0, [10])], first_scheduled_time=1.0),
                     CoreOutput(2, [SampleDelta(0, [20])], first_scheduled_time=1.0)]),
        StepOutputs([], None, [1, 2], [11, 21]),
        StepOutputs([CoreOutput(2, [SampleDelta(0, [22], finish_reason="length")], finished=True)], None, [1], [12]),
        StepOutputs([CoreOutput(1, [SampleDelta(0, [13], finish_reason="length")], finished=True)]),
    ]
    merged = decode_from_core(encode(steps[0]))
    for later in steps[1:]:
        merged.merge(decode_from_core(encode(later)))
    done = {state.request_id: output.outputs[0].token_ids for state, output in frontend.process(merged).outputs}
    assert done == {"a": [10, 11, 12, 13], "b": [20, 21, 22]}
