"""CUDA graphs for decode-only steps.

A decode step of a small model is a few hundred tiny kernels; launching them one
by one from Python costs more than running them. Each captured graph replays a
whole forward pass for one padded batch size. Padding rows have sequence length
0 and slot -1, so attention skips them and they write nothing to the cache.
"""

from __future__ import annotations

import logging
import time

import torch

from octavo.layers.attention import AttentionMetadata
from octavo.models.base import CausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({size for size in sizes if size <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model: CausalLM, device: torch.device, max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, hidden_size: int, dtype: torch.dtype) -> None:
        self.model = model
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch = self.batch_sizes[-1]
        self.max_model_len = max_model_len
        size = self.max_batch
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(size, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1], seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch], slot_mapping=self.slot_mapping[:batch],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[0] * batch,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every batch size, largest first so smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        pool = None
        for batch in reversed(self.batch_sizes):
            metadata = self._metadata(batch)
            for _ in range(2):  # warm-up: compile kernels and settle allocations outside the graph
                self.hidden[:batch] = self.model(self.input_ids[:batch], self.positions[:batch], metadata)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:batch] = self.model(self.input_ids[:batch], self.positions[:batch], metadata)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        logger.info("captured %d CUDA graphs (batch sizes up to %d) in %.1fs", len(self.graphs),
                    self.max_batch, elapsed)
        return elapsed

    def can_run(self, num_seqs: int, metadata: AttentionMetadata) -> bool:
        return metadata.is_decode_only and num_seqs <= self.max_batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        num_seqs = input_ids.shape[0]
        batch = next(size for size in self.batch_sizes if size >= num_seqs)
        width = metadata.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(positions)
        self.slot_mapping[:num_seqs].copy_(metadata.slot_mapping)
        self.slot_mapping[num_seqs:batch].fill_(-1)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens)
        self.seq_lens[num_seqs:batch].fill_(0)
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables)
        self.graphs[batch].replay()
        return self.hidden[:num_seqs]
