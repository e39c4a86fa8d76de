"""Pieces of the dense families that the parity tests reach only in part."""

from __future__ import annotations

import json

import pytest
import torch

from octavo import LLM
from octavo.layers.alibi import alibi_slopes


@pytest.mark.parametrize("num_heads", [1, 4, 6, 12, 16, 32, 71, 112])
def test_alibi_slopes_match_transformers(num_heads):
    """transformers rounds the slopes to bfloat16; ours are exact, so equal to within that rounding
    (powers of two, as for 4 or 32 heads, exactly)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    theirs = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]
    ours = alibi_slopes(num_heads)
    assert ours.shape == (num_heads,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.bfloat16().float(), theirs, rtol=2**-7, atol=0)
    assert len(set(ours.tolist())) == num_heads


def test_learned_positions_bound_max_model_len(tiny_model_factory):
    folder, _ = tiny_model_factory("gpt_bigcode")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(folder), dtype="float32", device="cpu", max_model_len=1024)


def test_missing_fused_qkv_is_reported(tiny_model_factory, tmp_path):
    """A checkpoint without one layer's fused q/k/v fails loading and says which tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = tiny_model_factory("bloom")
    broken = tmp_path / "bloom"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(name for name in weights if name.endswith("h.1.self_attention.query_key_value.weight"))
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    expected = r"missing 1 tensors: transformer\.h\.1\.self_attention\.query_key_value\.weight$"
    with pytest.raises(ValueError, match=expected):
        LLM(str(broken), dtype="float32", device="cpu", max_model_len=64)


def test_aquila_config_is_read_without_remote_code(tiny_model_factory, monkeypatch):
    """Aquila's config.json points at remote code; AutoConfig would ask to run it."""
    from transformers import AutoConfig

    from octavo.model_loader.loader import load_hf_config

    folder, _ = tiny_model_factory("aquila")
    assert json.loads((folder / "config.json").read_text())["auto_map"]

    def refuse(*args, **kwargs):
        raise AssertionError("AutoConfig must not be asked for a remote-code model type")

    monkeypatch.setattr(AutoConfig, "from_pretrained", refuse)
    config = load_hf_config(folder)
    assert config.architectures == ["AquilaForCausalLM"] and config.hidden_size == 64


def test_bigcode_cross_attention_is_refused(tmp_path):
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=64, n_layer=1, n_head=4, vocab_size=256, add_cross_attention=True,
                              architectures=["GPTBigCodeForCausalLM"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="add_cross_attention"):
        LLM(str(tmp_path), dtype="float32", device="cpu", max_model_len=64, load_format="dummy")


@pytest.mark.parametrize("arch", ["gptj", "gpt_bigcode", "falcon", "falcon_old", "falcon_rw", "bloom", "phi"])
def test_block_families_name_missing_tensors_as_saved(arch, tiny_model_factory):
    """Every name transformers saves maps onto a module of ours and back again, which is how a
    missing tensor is reported."""
    from octavo.model_loader.loader import load_hf_config
    from octavo.models.registry import resolve_model_class

    folder, hf_model = tiny_model_factory(arch)
    config = load_hf_config(folder)
    model = resolve_model_class(config)(config, max_position=64)
    ours = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name in hf_model.state_dict():
        if any(fragment in name for fragment in model.ignored_weights):
            continue
        renamed = model.rename_checkpoint_weight(name)
        module_name, _, param = model._linear_target(renamed)  # q_proj.weight -> qkv_proj, weight
        assert f"{module_name}.{param}" in ours, name
        assert model.checkpoint_name(renamed) == name
