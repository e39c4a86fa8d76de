"""MoE checkpoints load in both layouts transformers writes, and bad ones fail by name.

``save_pretrained`` writes one tensor per expert and projection by default (Mixtral's
``block_sparse_moe.experts.N.w1/w2/w3``, Qwen2-MoE's ``mlp.experts.N.gate_proj/up_proj/down_proj``,
as hub checkpoints have them); with ``save_original_format=False`` it writes the stacked
``mlp.experts.gate_up_proj`` / ``down_proj`` it keeps in memory.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from octavo import LLM
from octavo.model_loader import loader
from tests.test_parity import engine_greedy, make_llm, random_prompts


def _load(folder):
    config = loader.load_hf_config(folder)
    return loader.build_model(folder, config, torch.float32, torch.device("cpu"), max_model_len=64)


def _rewrite(folder, tmp_path, edit):
    """A copy of the model folder with its weights passed through ``edit(dict)``."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    weights = load_file(copy / "model.safetensors")
    edit(weights)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("arch,per_expert_name", [
    ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w1.weight"),
    ("qwen2_moe", "model.layers.0.mlp.experts.3.gate_proj.weight"),
])
def test_stacked_and_per_expert_layouts_load_the_same_weights(arch, per_expert_name, tiny_model_factory, tmp_path):
    per_expert_folder, hf_model = tiny_model_factory(arch)
    assert per_expert_name in load_file(per_expert_folder / "model.safetensors")
    stacked_folder = tmp_path / "stacked"
    hf_model.save_pretrained(stacked_folder, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(stacked_folder / "model.safetensors")

    per_expert, stacked = _load(per_expert_folder), _load(stacked_folder)
    hf_state = hf_model.state_dict()
    for name, param in stacked.named_parameters():
        torch.testing.assert_close(param, dict(per_expert.named_parameters())[name], rtol=0, atol=0)
        if ".experts." in name:  # octavo keeps transformers' in-memory layout for the stacks
            torch.testing.assert_close(param, hf_state[name], rtol=0, atol=0)
    prompts = random_prompts()[:3]
    assert engine_greedy(make_llm(stacked_folder), prompts) == engine_greedy(make_llm(per_expert_folder), prompts)


def test_a_missing_expert_tensor_is_named(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("mixtral")
    edited = _rewrite(folder, tmp_path, lambda w: w.pop("model.layers.1.block_sparse_moe.experts.2.w2.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: model\.layers\.1\.mlp\.experts\.2\.w2\.weight"):
        _load(edited)


def test_a_missing_expert_stack_is_named(tiny_model_factory, tmp_path):
    _, hf_model = tiny_model_factory("qwen2_moe")
    folder = tmp_path / "stacked"
    hf_model.save_pretrained(folder, save_original_format=False)
    edited = _rewrite(folder, tmp_path, lambda w: w.pop("model.layers.0.mlp.experts.down_proj"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: model\.layers\.0\.mlp\.experts\.down_proj"):
        _load(edited)


def test_an_expert_tensor_of_the_wrong_shape_is_named(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("mixtral")
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"

    def shrink(weights):
        weights[name] = weights[name][:-1].contiguous()

    with pytest.raises(ValueError, match=rf"{name}.* has shape \(95, 64\), the model expects \(96, 64\)"):
        _load(_rewrite(folder, tmp_path, shrink))


def test_an_expert_beyond_the_config_is_refused(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("mixtral")

    def add_expert(weights):
        weights["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(96, 64)

    with pytest.raises(ValueError, match=r"experts\.4\.w1\.weight.*names expert 4, but the config has 4 experts"):
        _load(_rewrite(folder, tmp_path, add_expert))


def test_unsupported_expert_activation_is_refused(tiny_model_factory, tmp_path):
    import json

    folder, _ = tiny_model_factory("mixtral")
    copy = tmp_path / "gelu"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LLM(str(copy), dtype="float32", device="cpu", max_model_len=64)
