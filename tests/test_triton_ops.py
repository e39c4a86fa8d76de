"""Paged-attention Triton kernels against a plain PyTorch fp32 reference.

Without CUDA the kernels run in the Triton interpreter (set before triton is imported), so the
CPU shapes are tiny. The ``gpu`` test covers realistic shapes in bf16/fp16.
"""

import importlib
import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from octavo.layers.attention import triton_ops as ops

# Another module may have imported the kernels before the interpreter was switched on.
if not torch.cuda.is_available() and not ops._interpreting():
    ops = importlib.reload(ops)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NULL_BLOCK = 0  # cache block filled with NaN; padding entries of block tables point at it


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def make_paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype=torch.float32,
                     invalid_before=None, spare_cols=2, device=DEVICE, seed=0):
    """Random K/V for every sequence, scattered over shuffled blocks.

    Everything the kernels must not read is NaN: the null block, unused blocks, slots past a
    sequence's end and (``invalid_before[b]``) tokens outside every query's sliding window.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq + [1]) + spare_cols
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # never hand out the null block
    block_tables = torch.full((len(seq_lens), max_blocks), NULL_BLOCK, dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    used = 0
    for b, n in enumerate(seq_lens):
        ids = perm[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, :len(ids)] = ids.to(torch.int32)
        kv = torch.randn(2, n, num_kv_heads, head_dim, generator=gen)
        if invalid_before is not None:
            kv[:, :invalid_before[b]] = float("nan")
        pos = torch.arange(n)
        kv_cache[:, ids[pos // block_size], pos % block_size] = kv
    return kv_cache.to(dtype).to(device), block_tables.to(device)


def gather_kv(kv_cache, block_tables, b, seq_len):
    block_size = kv_cache.shape[2]
    ids = block_tables[b, :math.ceil(seq_len / block_size)].long()
    k = kv_cache[0, ids].flatten(0, 1)[:seq_len].float()
    v = kv_cache[1, ids].flatten(0, 1)[:seq_len].float()
    return k, v


def reference_attention(query, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                        sliding_window=None, row_chunk=2048, alibi_slopes=None, soft_cap=None):
    """fp32 attention of each sequence's last q_len tokens over its gathered context, with
    optional soft-capping and ALiBi bias on the scaled scores."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    group = query.shape[1] // kv_cache.shape[3]
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_len = qsl[b + 1] - qsl[b]
        if q_len == 0:
            continue
        k, v = gather_kv(kv_cache, block_tables, b, seq_len)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        key_pos = torch.arange(seq_len, device=query.device)
        for r0 in range(0, q_len, row_chunk):
            r1 = min(q_len, r0 + row_chunk)
            q = query[qsl[b] + r0:qsl[b] + r1].float()
            q_pos = seq_len - q_len + torch.arange(r0, r1, device=query.device)
            visible = key_pos[None, :] <= q_pos[:, None]
            if sliding_window:
                visible &= q_pos[:, None] - key_pos[None, :] < sliding_window
            lo = 0 if not sliding_window else max(0, int(q_pos[0]) - sliding_window + 1)
            hi = int(q_pos[-1]) + 1
            s = torch.einsum("qhd,khd->hqk", q, k[lo:hi]) * scale
            if soft_cap is not None:
                s = soft_cap * torch.tanh(s / soft_cap)
            if alibi_slopes is not None:
                distance = key_pos[None, lo:hi] - q_pos[:, None]
                s = s + alibi_slopes.float()[:, None, None] * distance[None]
            s = s.masked_fill(~visible[None, :, lo:hi], float("-inf"))
            o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[lo:hi])
            out[qsl[b] + r0:qsl[b] + r1] = o
    return out


def alibi_test_slopes(num_heads):
    """Distinct slopes, large enough that the bias visibly reshapes the attention."""
    return torch.linspace(0.05, 0.9, num_heads, dtype=torch.float32, device=DEVICE)


def run_decode_case(seq_lens, block_size, head_dim, group, num_splits, window, num_kv_heads=2,
                    dtype=torch.float32, atol=1e-4, rtol=1e-4, seed=0, alibi=False, soft_cap=None):
    invalid = [max(0, n - window) for n in seq_lens] if window else None
    kv_cache, block_tables = make_paged_cache(seq_lens, block_size, num_kv_heads, head_dim,
                                              dtype, invalid_before=invalid, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    num_seqs = len(seq_lens)
    query = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen)
    query = query.to(dtype).to(DEVICE)
    out = torch.full_like(query, float("nan"))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    slopes = alibi_test_slopes(num_kv_heads * group) if alibi else None
    ops.paged_decode_attention(out, query, kv_cache, block_tables, lens, scale,
                               sliding_window=window, num_splits=num_splits,
                               alibi_slopes=slopes, logits_soft_cap=soft_cap)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE)
    ref = reference_attention(query, kv_cache, block_tables, qsl, lens, scale, window,
                              alibi_slopes=slopes, soft_cap=soft_cap)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


def run_prefill_case(ctx_lens, q_lens, block_size, head_dim, group, window, num_kv_heads=2,
                     dtype=torch.float32, atol=1e-4, rtol=1e-4, seed=0, alibi=False, soft_cap=None):
    """ctx_lens[b] tokens already cached before the q_lens[b] new (also cached) ones."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    invalid = [max(0, c - window + 1) for c in ctx_lens] if window else None
    kv_cache, block_tables = make_paged_cache(seq_lens, block_size, num_kv_heads, head_dim,
                                              dtype, invalid_before=invalid, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen)
    query = query.to(dtype).to(DEVICE)
    out = torch.full_like(query, float("nan"))
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32,
                       device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    slopes = alibi_test_slopes(num_kv_heads * group) if alibi else None
    ops.paged_prefill_attention(out, query, kv_cache, block_tables, qsl, lens, max(q_lens), scale,
                                sliding_window=window, alibi_slopes=slopes, logits_soft_cap=soft_cap)
    ref = reference_attention(query, kv_cache, block_tables, qsl, lens, scale, window,
                              alibi_slopes=slopes, soft_cap=soft_cap)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


# ---------------------------------------------------------------------------------------------
# Interpreter-sized tests (also run on a GPU)
# ---------------------------------------------------------------------------------------------


def test_triton_available():
    assert ops.triton_available()


@pytest.mark.parametrize("block_size,head_dim", [(1, 80), (4, 64), (16, 128)])
def test_store_kv(block_size, head_dim):
    num_kv_heads, num_blocks = 3, 12
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kv_cache = kv_cache.to(DEVICE)
    before = kv_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:7]
    slots[[1, 4]] = -1  # padding tokens
    key = torch.randn(7, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    value = torch.randn(7, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    ops.store_kv(key, value, kv_cache, slots.to(DEVICE))
    expected = before.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[0, s // block_size, s % block_size] = key[t]
            expected[1, s // block_size, s % block_size] = value[t]
    assert torch.equal(kv_cache, expected)


# (block_size, head_dim, group, num_splits, window)
DECODE_CASES = [
    (16, 64, 1, None, None),
    (4, 80, 2, 2, None),
    (1, 128, 4, 7, None),
    (4, 64, 2, 1, None),
    (32, 96, 2, 7, None),
    (4, 128, 1, 2, 10),
    (16, 64, 2, 7, 5),
    (1, 80, 4, None, 3),
    (4, 64, 4, 1, 17),
    (4, 64, 3, 2, None),  # group that is not a power of two
]


@pytest.mark.parametrize("block_size,head_dim,group,num_splits,window", DECODE_CASES)
def test_paged_decode_attention(block_size, head_dim, group, num_splits, window):
    # Lengths cover one key, ragged tiles, exact tile multiples and several tiles.
    run_decode_case([1, 16, 23, 40], block_size, head_dim, group, num_splits, window)


def test_decode_fp16():
    run_decode_case([7, 33], 4, 64, 2, 2, None, dtype=torch.float16, atol=2e-3, rtol=2e-3)


def test_decode_zero_length_rows_give_zeros():
    # Padded batch rows (seq_len 0) must not produce NaN, split or not.
    kv_cache, block_tables = make_paged_cache([9, 0], 4, 2, 64)
    query = torch.randn(2, 4, 64, device=DEVICE)
    lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        out = torch.full_like(query, float("nan"))
        ops.paged_decode_attention(out, query, kv_cache, block_tables, lens, 0.125,
                                   num_splits=splits)
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_splits_agree():
    outs = [run_decode_case([37, 5], 4, 64, 2, s, None, seed=3) for s in (1, 2, 7, 16)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


# (ctx_lens, q_lens, block_size, head_dim, group, window)
PREFILL_CASES = [
    ([0, 0], [13, 20], 16, 64, 1, None),  # plain prefill
    ([9, 20, 0], [7, 1, 18], 4, 80, 2, None),  # chunked prefill + a decode row
    ([5, 0, 12, 3], [0, 1, 25, 0], 1, 128, 4, None),  # empty rows mixed in
    ([17, 2], [16, 31], 4, 64, 2, 6),  # sliding window narrower than a tile
    ([11, 0, 30], [21, 33, 1], 16, 128, 1, 20),  # window wider than a tile
    ([3, 24], [12, 16], 32, 96, 4, 9),
    ([8, 0], [9, 14], 4, 64, 3, None),  # group that is not a power of two
]


@pytest.mark.parametrize("ctx_lens,q_lens,block_size,head_dim,group,window", PREFILL_CASES)
def test_paged_prefill_attention(ctx_lens, q_lens, block_size, head_dim, group, window):
    run_prefill_case(ctx_lens, q_lens, block_size, head_dim, group, window)


def test_prefill_other_tile_shapes(monkeypatch):
    # Tiles wider than the interpreter default: fewer, larger and unaligned key/query tiles.
    monkeypatch.setattr(ops, "PREFILL_BLOCK_M", 32)
    monkeypatch.setattr(ops, "PREFILL_BLOCK_N", 32)
    run_prefill_case([0, 7, 30], [35, 26, 2], 4, 64, 2, None)
    run_prefill_case([0, 7], [35, 26], 16, 64, 1, 12)


def test_prefill_fp16():
    run_prefill_case([6, 0], [10, 19], 4, 64, 2, None, dtype=torch.float16, atol=2e-3, rtol=2e-3)


def test_prefill_decode_rows_match_decode_kernel():
    ctx_lens = [12, 30, 4]  # one query token each
    seq_lens = [c + 1 for c in ctx_lens]
    kv_cache, block_tables = make_paged_cache(seq_lens, 4, 2, 64)
    query = torch.randn(3, 4, 64, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(4, dtype=torch.int32, device=DEVICE)
    a, b = torch.empty_like(query), torch.empty_like(query)
    ops.paged_prefill_attention(a, query, kv_cache, block_tables, qsl, lens, 1, 0.125)
    ops.paged_decode_attention(b, query, kv_cache, block_tables, lens, 0.125, num_splits=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# (block_size, head_dim, group, num_splits, window, alibi, soft_cap)
SCORE_MOD_DECODE_CASES = [
    (4, 64, 1, 2, None, True, None),  # BLOOM-like: ALiBi, one query head per KV head
    (16, 64, 4, 1, 5, True, None),  # ALiBi with GQA and a sliding window
    (4, 80, 2, 3, None, False, 1.5),  # Gemma-2-like soft-cap
    (1, 64, 2, None, 7, False, 2.0),  # soft-cap with a window
    (4, 64, 3, 2, None, True, 1.0),  # both, odd group
]


@pytest.mark.parametrize("block_size,head_dim,group,num_splits,window,alibi,soft_cap",
                         SCORE_MOD_DECODE_CASES)
def test_decode_alibi_and_soft_cap(block_size, head_dim, group, num_splits, window, alibi, soft_cap):
    run_decode_case([1, 16, 23, 40], block_size, head_dim, group, num_splits, window,
                    alibi=alibi, soft_cap=soft_cap)


# (ctx_lens, q_lens, block_size, head_dim, group, window, alibi, soft_cap)
SCORE_MOD_PREFILL_CASES = [
    ([9, 20, 0], [7, 1, 18], 4, 80, 1, None, True, None),
    ([17, 2], [16, 31], 4, 64, 2, 6, True, None),
    ([0, 5], [20, 9], 16, 64, 2, None, False, 1.5),
    ([11, 0], [21, 17], 4, 64, 2, 9, False, 2.0),
    ([8, 0], [9, 14], 4, 64, 3, None, True, 1.0),
    ([3], [20], 4, 256, 2, None, False, 1.5),  # Gemma-2 head size: the wide-head tile shape
]


@pytest.mark.parametrize("ctx_lens,q_lens,block_size,head_dim,group,window,alibi,soft_cap",
                         SCORE_MOD_PREFILL_CASES)
def test_prefill_alibi_and_soft_cap(ctx_lens, q_lens, block_size, head_dim, group, window, alibi,
                                    soft_cap):
    run_prefill_case(ctx_lens, q_lens, block_size, head_dim, group, window, alibi=alibi,
                     soft_cap=soft_cap)


def test_score_mods_fp16():
    tol = dict(dtype=torch.float16, atol=2e-3, rtol=2e-3, alibi=True, soft_cap=1.5)
    run_decode_case([7, 33], 4, 64, 2, 2, None, **tol)
    run_prefill_case([6, 0], [10, 19], 4, 64, 2, None, **tol)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [7, 1, 18]], ids=["decode", "prefill"])
@pytest.mark.parametrize("window", [None, 6])
def test_torch_backend_score_mods_match_reference(q_lens, window):
    """The PyTorch reference backend's ALiBi / soft-cap path against the plain fp32 reference,
    with GQA (the backend folds a group's heads into rows, so each row needs its own slope)."""
    from octavo.layers.attention.metadata import AttentionMetadata
    from octavo.layers.attention.torch_backend import TorchAttentionBackend

    ctx_lens = [9, 20, 3]
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    kv_cache, block_tables = make_paged_cache(seq_lens, 4, 2, 32, spare_cols=0)
    kv_cache = torch.nan_to_num(kv_cache)  # the reference path multiplies whole blocks
    query = torch.randn(sum(q_lens), 8, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    slopes = alibi_test_slopes(8)
    metadata = AttentionMetadata(
        query_start_loc=qsl, seq_lens=lens, block_tables=block_tables,
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.long, device=DEVICE),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens,
    )
    out = TorchAttentionBackend().attend(query, kv_cache, metadata, 0.2, window, alibi_slopes=slopes,
                                         logits_soft_cap=1.5)
    ref = reference_attention(query, kv_cache, block_tables, qsl, lens, 0.2, window,
                              alibi_slopes=slopes, soft_cap=1.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_soft_cap_tanh_saturates():
    # Scores far beyond the cap (q scaled up) must come out as exactly +-cap, never NaN.
    kv_cache, block_tables = make_paged_cache([20], 4, 1, 64)
    query = 1e4 * torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    lens = torch.tensor([20], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(query, float("nan"))
    ops.paged_decode_attention(out, query, kv_cache, block_tables, lens, 0.125, logits_soft_cap=3.0)
    qsl = torch.arange(2, dtype=torch.int32, device=DEVICE)
    ref = reference_attention(query, kv_cache, block_tables, qsl, lens, 0.125, soft_cap=3.0)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "bloom", "gemma2"])
def test_engine_on_the_triton_backend_matches_the_reference(arch, tiny_model_factory):
    """The whole engine on the Triton kernels (interpreted on the CPU) against the PyTorch
    backend. A 12-token step budget makes mixed batches, which the Triton backend splits
    into a decode-kernel block and a prefill-kernel block; mistral adds a sliding window, bloom
    ALiBi, gemma2 soft-capping on a sliding and a global layer."""
    from octavo import LLM, SamplingParams

    folder, _ = tiny_model_factory(arch)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(rng.randint(2, 20))]} for _ in range(4)]
    outputs, logprobs, mixed = {}, {}, []
    for backend in ("torch", "triton"):
        llm = LLM(str(folder), device=DEVICE, dtype="float32", attention_backend=backend, max_model_len=64,
                  block_size=4, max_num_batched_tokens=12, enforce_eager=True,
                  gpu_memory_utilization=0.1,  # both engines share the card on CUDA
                  engine_core_process=False)  # the test looks inside the runner
        def spy(*args, metadata_of=llm.llm_engine.core.runner._metadata, **kwargs):
            metadata, extra = metadata_of(*args, **kwargs)
            mixed.append(metadata.prefill is not None)
            return metadata, extra

        llm.llm_engine.core.runner._metadata = spy
        results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, logprobs=0), use_tqdm=False)
        outputs[backend] = [o.outputs[0].token_ids for o in results]
        logprobs[backend] = [[step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                             for o in results]
    assert outputs["triton"] == outputs["torch"]
    # Tokens of tiny random models rarely move; the chosen tokens' logprobs show a wrong score.
    torch.testing.assert_close(torch.tensor(logprobs["triton"]), torch.tensor(logprobs["torch"]), atol=2e-4, rtol=0)
    assert any(mixed), "the step budget was meant to mix decodes with prefill chunks"


def test_auto_num_splits():
    h100 = 132
    # A big batch already fills the GPU: no split.
    assert ops._auto_num_splits(256, 8, 1024, h100) == 1
    # One long sequence: many splits, each still several tiles long.
    one_long = ops._auto_num_splits(1, 8, 32768, h100)
    assert 32 <= one_long <= ops._SPLIT_MAX
    assert 32768 / one_long >= ops._SPLIT_MIN_TILES * 64
    # Short contexts are not split into slivers.
    assert ops._auto_num_splits(1, 8, 128, h100) == 1
    assert ops._auto_num_splits(4, 8, 4096, h100) > 1


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes in half precision, compared with the fp32 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_shapes(dtype):
    tol = {"atol": 2e-2, "rtol": 2e-2}
    # Qwen3-0.6B-like heads: 16 q heads, 8 kv heads, head_dim 128, block 16.
    run_decode_case([1024] * 256, 16, 128, 2, None, None, num_kv_heads=8, dtype=dtype, **tol)
    run_decode_case([32768], 16, 128, 2, None, None, num_kv_heads=8, dtype=dtype, **tol)
    lens = torch.randint(1, 32769, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    run_decode_case(lens + [1, 2, 17, 32768], 16, 128, 4, None, None, num_kv_heads=4,
                    dtype=dtype, **tol)
    run_decode_case(lens, 32, 64, 8, 5, 4096, num_kv_heads=2, dtype=dtype, **tol)
    run_decode_case([5000, 77, 1], 1, 80, 1, 3, None, num_kv_heads=4, dtype=dtype, **tol)
    # Prefill: long prompts, chunked prefill with cached prefixes, decode/empty rows mixed in.
    run_prefill_case([0, 0, 3000, 0, 100], [4096, 77, 1000, 0, 1], 16, 128, 2, None,
                     num_kv_heads=8, dtype=dtype, **tol)
    run_prefill_case([0], [8192], 16, 128, 2, None, num_kv_heads=8, dtype=dtype, **tol)
    run_prefill_case([1000, 0, 5], [2000, 3000, 1], 16, 128, 4, 1024, num_kv_heads=4,
                     dtype=dtype, **tol)
    run_prefill_case([300, 7], [500, 64], 4, 80, 7, None, num_kv_heads=2, dtype=dtype, **tol)
    # store_kv with padding slots in half precision.
    kv_cache = torch.zeros(2, 64, 16, 8, 128, dtype=dtype, device="cuda")
    key = torch.randn(100, 8, 128, dtype=dtype, device="cuda")
    value = torch.randn(100, 8, 128, dtype=dtype, device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:100]
    slots[::7] = -1
    ops.store_kv(key, value, kv_cache, slots)
    keep = slots >= 0
    s = slots[keep]
    assert torch.equal(kv_cache[0, s // 16, s % 16], key[keep])
    assert torch.equal(kv_cache[1, s // 16, s % 16], value[keep])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_alibi_and_soft_cap_large_shapes(dtype):
    """ALiBi at BLOOM / Falcon-RW shapes and soft-capping at Gemma-2's (head_dim 256, GQA,
    sliding window), decode (split and not) and prefill, against the fp32 reference."""
    tol = {"atol": 2e-2, "rtol": 2e-2}
    lens = torch.randint(1, 8193, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    alibi = dict(dtype=dtype, alibi=True, **tol)
    run_decode_case(lens + [1, 4096], 16, 128, 1, None, None, num_kv_heads=16, **alibi)
    run_decode_case(lens, 16, 64, 1, 4, None, num_kv_heads=32, **alibi)
    run_decode_case(lens, 16, 64, 8, None, 2048, num_kv_heads=4, **alibi)
    run_prefill_case([0, 700, 5], [2048, 300, 1], 16, 128, 1, None, num_kv_heads=16, **alibi)
    run_prefill_case([0, 100], [1500, 64], 16, 64, 8, 512, num_kv_heads=4, **alibi)
    capped = dict(dtype=dtype, soft_cap=50.0, **tol)
    run_decode_case(lens + [1, 4096], 16, 256, 2, None, None, num_kv_heads=8, **capped)
    run_decode_case(lens, 16, 256, 2, 3, 4096, num_kv_heads=4, **capped)
    run_prefill_case([0, 1000, 3], [3000, 500, 1], 16, 256, 2, 4096, num_kv_heads=4, **capped)
    run_prefill_case([0, 40], [2000, 300], 16, 256, 2, None, num_kv_heads=8, **capped)
    run_decode_case(lens, 16, 128, 4, None, None, num_kv_heads=2, alibi=True, soft_cap=30.0,
                    dtype=dtype, **tol)
