"""The CPU attention paths: the flash-attention CPU backend against the reference, and both
against plain dense attention, over shuffled paged caches; prefill memory stays linear."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from octavo.layers.attention.cpu_backend import CpuAttentionBackend, cpu_flash_available
from octavo.layers.attention.cpu_paged import load_paged_decode, paged_decode, paged_decode_error
from octavo.layers.attention.metadata import AttentionMetadata, PrefillPart
from octavo.layers.attention.torch_backend import QUERY_TILE, TorchAttentionBackend

pytestmark = pytest.mark.skipif(not cpu_flash_available(), reason="torch has no flash attention for CPU")

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 16, 4
SCALE = HEAD_DIM**-0.5


def dense_attention(query, keys, values, sliding_window=None):
    """query [q, Hq, D] at the last q of k positions; keys/values [k, Hkv, D]."""
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), keys.double()) * SCALE
    query_pos = torch.arange(keys.shape[0] - query.shape[0], keys.shape[0])[:, None]
    key_pos = torch.arange(keys.shape[0])[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= query_pos - key_pos < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.double()).float()


def paged_batch(contexts: list[int], query_lens: list[int], seed: int = 0):
    """A paged cache holding each sequence's K/V in shuffled blocks, and the step's metadata
    (one-token rows first, as the model runner orders them)."""
    rng = random.Random(seed)
    seq_lens = [c + q for c, q in zip(contexts, query_lens)]
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    physical = list(range(sum(blocks_per_seq) + 3))
    rng.shuffle(physical)
    kv_cache = torch.randn(2, len(physical), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    tables, dense_kv, taken = [], [], 0
    for seq_len, count in zip(seq_lens, blocks_per_seq):
        table = physical[taken:taken + count]
        taken += count
        tables.append(table + [0] * (max(blocks_per_seq) - count))
        dense_kv.append(kv_cache[:, table].flatten(1, 2)[:, :seq_len])
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    table_tensor = torch.tensor(tables, dtype=torch.int32)
    prefill = None
    if 0 < num_decodes < len(query_lens):
        prefill = PrefillPart(torch.tensor(starts[num_decodes:]) - num_decodes,
                              torch.tensor(seq_lens[num_decodes:]), table_tensor[num_decodes:])
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=table_tensor, slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens, num_decodes=num_decodes, prefill=prefill)
    query = torch.randn(starts[-1], NUM_Q_HEADS, HEAD_DIM)
    return query, kv_cache, metadata, dense_kv


def expected(query, metadata, dense_kv, sliding_window=None):
    starts = metadata.query_start_loc_cpu
    return torch.cat([dense_attention(query[starts[i]:starts[i + 1]], kv[0], kv[1], sliding_window)
                      for i, kv in enumerate(dense_kv)])


CASES = {
    "decodes": ([5, 17, 0, 30], [1, 1, 1, 1]),
    "fresh prompts": ([0, 0, 0], [9, 1, 23]),
    "chunks after cached context": ([12, 3, 40], [7, 16, 2]),
    "mixed decodes and chunks": ([20, 8, 0, 33], [1, 1, 13, 6]),
    "chunk longer than a query tile": ([37, 0], [QUERY_TILE + 45, 2 * QUERY_TILE + 3]),
}


@pytest.mark.parametrize("paged_decode", [True, False], ids=["paged-decode-kernel", "gather-sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_backend_matches_reference_and_dense(case, paged_decode):
    contexts, query_lens = CASES[case]
    query, kv_cache, metadata, dense_kv = paged_batch(contexts, query_lens)
    want = expected(query, metadata, dense_kv)
    backend = CpuAttentionBackend(paged_decode=paged_decode)
    if paged_decode and not backend.paged_decode:
        pytest.skip(f"the paged decode kernel did not build: {paged_decode_error()}")
    fast = backend.attend(query, kv_cache, metadata, SCALE, None)
    reference = TorchAttentionBackend().attend(query, kv_cache, metadata, SCALE, None)
    torch.testing.assert_close(reference, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["mixed decodes and chunks", "chunk longer than a query tile"])
def test_sliding_window_tiles_match_dense(case):
    contexts, query_lens = CASES[case]
    query, kv_cache, metadata, dense_kv = paged_batch(contexts, query_lens, seed=1)
    for window in (5, QUERY_TILE + 7):
        want = expected(query, metadata, dense_kv, window)
        for backend in (TorchAttentionBackend(), CpuAttentionBackend()):
            got = backend.attend(query, kv_cache, metadata, SCALE, window)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest new tensor (not a view) any operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {arg.untyped_storage().data_ptr() for arg in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(arg, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_prefill_memory_is_linear_in_the_chunk(backend, tmp_path):
    """One 2,000-token chunk through a whole (tiny) model: no tensor of the step reaches
    tokens x tokens elements, where a materialised score matrix or mask would be
    tokens x tokens x heads."""
    from octavo import LLM, SamplingParams
    from tests.conftest import _llama_config

    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config(max_position_embeddings=4096)).save_pretrained(tmp_path)
    num_tokens = 2000
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", max_model_len=4096, attention_backend=backend,
              max_num_batched_tokens=4096, kv_cache_memory=64 << 20)
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(3, 256) for _ in range(num_tokens)]}
    with _LargestTensor() as spy:
        llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.llm_engine.core.num_prefill_tokens_computed == num_tokens  # one chunk
    assert spy.largest < num_tokens * num_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_on_the_cpu_backend_matches_the_reference_and_hf(arch, tiny_model_factory):
    """Whole engine, paging stress (shuffled blocks of 4, a 12-token step budget that chunks
    prompts and mixes decodes with chunks, preemption): the CPU backend gives the reference
    backend's greedy tokens and logprobs, and transformers' tokens."""
    from octavo import LLM, SamplingParams
    from tests.test_parity import hf_greedy

    folder, model = tiny_model_factory(arch)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    results = {}
    for backend in ("torch", "cpu"):
        llm = LLM(str(folder), device="cpu", dtype="float32", attention_backend=backend, max_model_len=64,
                  block_size=4, max_num_batched_tokens=12, num_gpu_blocks_override=20, max_num_seqs=6)
        assert llm.llm_engine.core.runner.backend.name == backend
        llm.llm_engine.core.kv_cache.pool.shuffle_free_queue(random.Random(1))
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[backend] = [(o.outputs[0].token_ids, [next(iter(step.values())).logprob for step in o.outputs[0].logprobs])
                            for o in outputs]
        assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert [tokens for tokens, _ in results["cpu"]] == [tokens for tokens, _ in results["torch"]]
    for (_, fast), (_, reference) in zip(results["cpu"], results["torch"]):
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=0)
    assert [tokens for tokens, _ in results["cpu"]] == [hf_greedy(model, p, 8)[0] for p in prompts]


@pytest.mark.skipif(not load_paged_decode(), reason="the paged decode kernel did not build")
@pytest.mark.parametrize("block_size, group, head_dim", [(16, 3, 64), (4, 1, 64), (8, 4, 64), (16, 7, 64),
                                                        (16, 2, 128), (8, 5, 128), (16, 3, 40)])
def test_paged_decode_kernel_against_dense(block_size, group, head_dim):
    """Lengths that end mid-block, at a block's end, one token, and tables padded past the
    sequence's blocks with garbage entries the kernel must not read. Head sizes 64 and 128 take
    the register-resident path where the build has AVX-512 (groups split into chunks of 4 or 2
    query heads), 40 the generic loop."""
    rng = random.Random(block_size)
    kv_heads = 2
    lengths = [1, block_size, block_size + 1, 5 * block_size - 3, 77]
    per_seq = [-(-n // block_size) for n in lengths]
    physical = list(range(sum(per_seq) + 2))
    rng.shuffle(physical)
    kv_cache = torch.randn(2, len(physical), block_size, kv_heads, head_dim)
    width = max(per_seq) + 2
    tables, dense, taken = [], [], 0
    for n, count in zip(lengths, per_seq):
        table = physical[taken:taken + count]
        taken += count
        tables.append(table + [10**6] * (width - count))  # out of range: read would fail the check
        dense.append(kv_cache[:, table].flatten(1, 2)[:, :n])
    query = torch.randn(len(lengths), kv_heads * group, head_dim)
    scale = head_dim**-0.5
    got = paged_decode(query, kv_cache, torch.tensor(tables, dtype=torch.int32),
                       torch.tensor(lengths, dtype=torch.int32), scale)
    for row, (keys, values) in enumerate(dense):
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", query[row].double(), keys.double()) * scale
        want = torch.einsum("hk,khd->hd", scores.softmax(-1), values.double()).float()
        torch.testing.assert_close(got[row], want, atol=2e-5, rtol=1e-4)
