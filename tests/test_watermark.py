"""Green-list watermarking: 200 watermarked tokens are detected (z > 4), unwatermarked ones are
not (z < 2), with the previous token that seeds the list read on the device under pipelined
scheduling.

The fixture model has near-uniform next-token distributions (weights drawn with std 0.02): a
watermark can only shift the choice where the model leaves a choice, and a peaked random model
(std 0.2) repeats a handful of tokens, which says nothing about detection. High entropy is the
regime the scheme is designed for, and the one where a wrong green list would show at once.
"""

from __future__ import annotations

import os

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.entrypoints.cli import main
from octavo.watermark import detect_watermark, green_mask, is_green
from tests.structured_fixtures import build_structured_model

NUM_TOKENS = 200
DEVICE = os.environ.get("OCTAVO_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat")
    build_structured_model(folder, initializer_range=0.02)
    return folder


@pytest.fixture(scope="module")
def engines(model_folder):
    """{async_scheduling: LLM}"""
    made = {mode: LLM(str(model_folder), device=DEVICE, dtype="float32", async_scheduling=mode,
                      kv_cache_memory=8 << 20, gpu_memory_utilization=0.2) for mode in (True, False)}
    yield made
    made.clear()


def generate(engines, async_scheduling: bool, **params) -> list[list[int]]:
    prompts = ["Hello", "The capital of France is", "What is the weather like?"]
    outputs = engines[async_scheduling].generate(
        prompts, [SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True, seed=7 + i, **params) for i in range(3)],
        use_tqdm=False)
    # The prompt's last token seeds the first generated token's list.
    return [o.prompt_token_ids[-1:] + o.outputs[0].token_ids for o in outputs]


def test_watermarked_text_is_detected_and_plain_text_is_not(engines):
    for tokens in generate(engines, async_scheduling=True, watermark=True):
        assert detect_watermark(tokens).z_score > 4
    for tokens in generate(engines, async_scheduling=True):
        assert abs(detect_watermark(tokens).z_score) < 2


def test_pipelined_and_plain_steps_watermark_alike(engines):
    params = dict(watermark=True, watermark_gamma=0.5, watermark_delta=1.0, watermark_key=1234)
    assert generate(engines, True, **params) == generate(engines, False, **params)
    tokens = generate(engines, True, **params)[0]
    assert detect_watermark(tokens, gamma=0.5, key=1234).z_score > 4
    assert detect_watermark(tokens, gamma=0.5).z_score < 2  # another key: no watermark to see


def test_green_mask_matches_the_detector():
    previous = torch.tensor([0, 5, 5, 300])
    mask = green_mask(previous, 1000, torch.tensor([0.25, 0.25, 0.5, 0.1]), torch.tensor([1, 1, 1, 2]))
    assert mask.shape == (4, 1000)
    for row, (prev, gamma, key) in enumerate([(0, 0.25, 1), (5, 0.25, 1), (5, 0.5, 1), (300, 0.1, 2)]):
        assert mask[row].tolist() == is_green([prev] * 1000, range(1000), gamma, key)
        assert abs(mask[row].float().mean().item() - gamma) < 0.05
    assert mask[1].sum() < mask[2].sum()


def test_detect_cli(engines, model_folder, capsys):
    tokens = generate(engines, True, watermark=True)[0]
    assert main(["watermark", "detect", "--token-ids", ",".join(map(str, tokens))]) == 0
    assert "-> watermarked" in capsys.readouterr().out
    text = "The capital of France is Paris. Hello, my name is octavo."
    assert main(["watermark", "detect", "--model", str(model_folder), text]) == 0
    assert "not watermarked" in capsys.readouterr().out
    assert main(["watermark", "detect", "--token-ids", "5"]) == 2  # too short: an error, not a traceback


def test_watermark_params_are_validated():
    for field, value in [("watermark_gamma", 0.0), ("watermark_delta", -1.0), ("watermark", "yes")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
