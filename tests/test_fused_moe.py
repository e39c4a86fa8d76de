"""The fused MoE Triton kernels against the PyTorch reference experts, and the router against
transformers'.

Without CUDA the kernels run in the Triton interpreter on small shapes in fp32 and fp16. On CUDA
the same checks run, plus realistic shapes in bf16 across 1..8192 tokens and a replay of the
kernels captured in a CUDA graph with routings that differ from the captured one.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from octavo.layers.moe import fused_experts_reference, fused_moe, select_experts

# Imported before the interpreter was switched on: rebuild the kernels as interpreted ones.
if not torch.cuda.is_available() and isinstance(fused_moe._align_kernel, triton.runtime.JITFunction):
    fused_moe = importlib.reload(fused_moe)

# The interpreter's numpy exp overflows to inf on saturated silu inputs, as the GPU's does.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 2e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
}


def skewed_routing(num_tokens: int, num_experts: int, top_k: int, seed: int, empty: int = 1):
    """``top_k`` distinct experts per token, drawn unevenly (expert 0 most often) and never one of
    the last ``empty`` experts; weights positive and summing to one per token."""
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.tensor([2.0 ** -(e % 4) for e in range(num_experts)])
    popularity[num_experts - empty:] = 0.0
    ids = torch.multinomial(popularity.expand(num_tokens, -1), top_k, replacement=False, generator=gen)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return (weights / weights.sum(-1, keepdim=True)).to(DEVICE), ids.to(torch.int32).to(DEVICE)


def make_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5
    return gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def check_against_reference(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0, empty=1):
    gate_up, down = make_experts(num_experts, hidden, inter, dtype, seed)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    weights, ids = skewed_routing(num_tokens, num_experts, top_k, seed, empty)
    got = fused_moe.fused_experts(x, gate_up, down, weights, ids)
    # The reference in fp32 on the same (rounded) weights: the kernels accumulate in fp32.
    expected = fused_experts_reference(x.float(), gate_up.float(), down.float(), weights, ids)
    assert got.dtype == dtype and got.shape == (num_tokens, hidden)
    torch.testing.assert_close(got.float(), expected, **TOLERANCES[dtype])


# ---------------------------------------------------------------------------------------------
# Sorting the pairs by expert
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [
    (1, 8, 2, 16), (37, 6, 3, 16), (50, 5, 1, 32), (3, 64, 8, 16), (200, 4, 2, 16),
])
def test_align_sorts_pairs_by_expert_into_padded_blocks(num_tokens, num_experts, top_k, block_m):
    _, ids = skewed_routing(num_tokens, num_experts, top_k, seed=num_tokens, empty=2 if num_experts > 4 else 1)
    sorted_pairs, block_experts = fused_moe.align_pairs(ids, num_experts, block_m)
    flat = ids.reshape(-1).cpu()
    num_pairs = flat.numel()
    # Expected: each expert's pairs in pair order, its run padded with num_pairs to whole blocks.
    expected_pairs, expected_experts = [], []
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().flatten().tolist()
        blocks = -(-len(pairs) // block_m)
        expected_pairs += pairs + [num_pairs] * (blocks * block_m - len(pairs))
        expected_experts += [expert] * blocks
    # Static sizes: the bound for this many pairs, whatever the routing.
    num_blocks = -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)
    expected_pairs += [num_pairs] * (num_blocks * block_m - len(expected_pairs))
    expected_experts += [-1] * (num_blocks - len(expected_experts))
    assert sorted_pairs.dtype == block_experts.dtype == torch.int32
    assert sorted_pairs.cpu().tolist() == expected_pairs
    assert block_experts.cpu().tolist() == expected_experts


# ---------------------------------------------------------------------------------------------
# The fused experts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("num_tokens", [1, 5, 37])
def test_fused_experts_match_reference(num_tokens, num_experts, top_k, dtype):
    # Sizes that are no multiple of the tiles exercise the column and depth masks.
    check_against_reference(num_tokens, num_experts, top_k, hidden=48, inter=40, dtype=dtype, seed=num_tokens)


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these tiles on the GPU")
@pytest.mark.parametrize("num_tokens,dtype", [(3, torch.float16), (50, torch.float16), (100, torch.float32),
                                              (300, torch.float16)])
def test_gpu_tiles_match_reference_in_the_interpreter(num_tokens, dtype, monkeypatch):
    """The GPU's tile sizes (row blocks 16..128, wide columns, deep steps) on small shapes, run
    by the interpreter: their masks and block walk are checked in CI too."""
    monkeypatch.setattr(fused_moe, "_interpreting", lambda: False)
    tiles = fused_moe.moe_tiles(num_tokens * 2, 8, dtype)
    assert tiles.block_m == {3: 16, 50: 32, 100: 64, 300: 128}[num_tokens]
    check_against_reference(num_tokens, 8, 2, hidden=96, inter=80, dtype=dtype, seed=num_tokens)


def test_fused_experts_with_most_experts_idle():
    # 20 tokens over 2 of 16 experts: 14 experts get no token, the rest run several row blocks.
    check_against_reference(20, 16, 2, hidden=32, inter=32, dtype=torch.float32, empty=14)


def test_fused_experts_with_no_tokens():
    gate_up, down = make_experts(4, 32, 16, torch.float32)
    x = torch.empty(0, 32, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    out = fused_moe.fused_experts(x, gate_up, down, torch.empty(0, 2, device=DEVICE), ids)
    assert out.shape == (0, 32)


def test_tiles_follow_rows_per_expert(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    bf16 = [fused_moe.moe_tiles(2 * tokens, 8, torch.bfloat16) for tokens in (1, 32, 64, 128, 256, 8192)]
    assert [tiles.block_m for tiles in bf16] == sorted(tiles.block_m for tiles in bf16)
    assert bf16[0].block_m == 16 and bf16[-1].block_m == 128
    # Mixtral decode at 256 sequences: 64 rows per expert fit one 128-row block.
    assert bf16[4].block_m == 128
    fp32 = fused_moe.moe_tiles(2 * 256, 8, torch.float32)
    assert fp32.block_m == 128 and fp32.gate_up.block_k == bf16[4].gate_up.block_k // 2


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_router_matches_transformers(family):
    import transformers as tf

    if family == "mixtral":
        config = tf.MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
        router = tf.models.mixtral.modeling_mixtral.MixtralTopKRouter(config)
        renormalize = True
    else:
        config = tf.Qwen2MoeConfig(hidden_size=32, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False)
        router = tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter(config)
        renormalize = False
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(17, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(x)
    weights, ids = select_experts(logits, config.num_experts_per_tok, renormalize)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(weights, hf_weights.float())
    assert torch.allclose(weights.sum(-1), torch.ones(17)) == renormalize


# ---------------------------------------------------------------------------------------------
# CUDA: realistic shapes, every token count class, and CUDA graphs
# ---------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@cuda_only
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4), (64, 8)])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 7, 16, 33, 64, 100, 256, 511, 1024, 2048, 4096, 8192])
def test_fused_experts_on_cuda_across_token_counts(num_tokens, num_experts, top_k):
    # 1400 is no multiple of the GPU tiles either.
    check_against_reference(num_tokens, num_experts, top_k, hidden=1024, inter=1400, dtype=torch.bfloat16,
                            seed=num_tokens, empty=max(1, num_experts // 8))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_experts_on_cuda_in_fp32_and_fp16(dtype):
    check_against_reference(300, 8, 2, hidden=512, inter=704, dtype=dtype)


@cuda_only
@pytest.mark.parametrize("num_tokens", [1, 8, 256])
def test_fused_experts_replay_in_a_cuda_graph(num_tokens):
    """Captured once, replayed with other routings (other idle experts): no host sync, no shape
    that depends on the routing, so every replay must match the reference."""
    num_experts, top_k, hidden, inter = 8, 2, 512, 704
    gate_up, down = make_experts(num_experts, hidden, inter, torch.bfloat16)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    weights, ids = skewed_routing(num_tokens, num_experts, top_k, seed=0)
    for _ in range(2):  # compile outside the capture
        fused_moe.fused_experts(x, gate_up, down, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe.fused_experts(x, gate_up, down, weights, ids)
    for seed, empty in [(1, 1), (2, 6), (3, 3)]:
        new_weights, new_ids = skewed_routing(num_tokens, num_experts, top_k, seed=seed, empty=empty)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        x.copy_(torch.randn_like(x))
        graph.replay()
        expected = fused_experts_reference(x.float(), gate_up.float(), down.float(), weights, ids)
        torch.testing.assert_close(out.float(), expected, **TOLERANCES[torch.bfloat16])


@cuda_only
def test_moe_layer_uses_the_kernels_on_cuda(monkeypatch):
    from octavo.layers.moe import SparseMoeBlock

    calls = []
    original = fused_moe.fused_experts
    monkeypatch.setattr(fused_moe, "fused_experts", lambda *args: calls.append(1) or original(*args))
    block = SparseMoeBlock(64, 4, 2, 32, renormalize=True).to(DEVICE)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(block.experts.down_proj, std=0.1)
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        got = block(x)
        weights, ids = select_experts(block.gate(x), 2, True)
        expected = fused_experts_reference(x, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    assert calls
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
