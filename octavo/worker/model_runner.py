"""From a scheduled batch to sampled tokens: flatten, run the model, sample.

The runner owns the model, the KV cache tensors and the sampler. It turns the
scheduler's "these sequences, this many tokens each" into one flat, unpadded
token batch with the attention metadata that says who is who.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Optional, Sequence as SequenceOf

import numpy as np
import torch

from octavo.engine.request import Sequence
from octavo.engine.scheduler import ScheduledBatch
from octavo.layers.attention import AttentionMetadata, get_attention_backend
from octavo.layers.attention.metadata import PrefillPart
from octavo.models.base import CausalLM
from octavo.structured_output.manager import BitmaskFiller, constrained_rows
from octavo.worker.cuda_graphs import DecodeGraphs
from octavo.worker.input_staging import InputStaging
from octavo.worker.sampler import (
    DeviceSamplerOutput,
    Sampler,
    SamplingRow,
    compute_prompt_logprobs,
    has_penalty,
    is_masked_greedy,
    is_plain_greedy,
)

logger = logging.getLogger(__name__)

_PROMPT_LOGPROBS_ROWS = 256  # prompt positions turned into logits at a time


@dataclass
class StepResult:
    # One entry per sampling sequence, in the order of ``LaunchedStep.samplers``.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: Optional[list[Optional[dict[int, tuple[float, int]]]]] = None  # with params.logprobs
    # seq_id -> prompt logprob entries for the prompt positions computed this step
    prompt_logprobs: dict[int, list[dict[int, tuple[float, int]]]] = field(default_factory=dict)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_seqs: list[Sequence]
    sample_indices: torch.Tensor  # rows of the hidden states to turn into logits
    host_positions: Optional[np.ndarray] = None  # the host's copies, kept for the next step's diffs
    host_tables: Optional[np.ndarray] = None


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device; ``wait`` collects its tokens.

    The sampled ids also stay on the device (``device_token_ids``, one row per sampling
    sequence, in the order of ``samplers``), so the next step can start from them before the
    host has seen them.
    """

    result: StepResult
    samplers: list[Sequence] = field(default_factory=list)
    output: Optional[DeviceSamplerOutput] = None
    device_token_ids: Optional[torch.Tensor] = None
    # A steady decode step (see ``_SteadyBatch``): every row decodes one token, and
    # ``full_block_rows`` are the rows whose last block this step fills.
    steady: bool = False
    full_block_rows: list[int] = field(default_factory=list)
    _row_of_seq: Optional[dict[int, int]] = None
    # Set while the step's sampling waits for the previous step's tokens (see ``ModelRunner.launch``).
    deferred_sampling: Optional[Callable[[], None]] = None

    def row_of_seq(self) -> dict[int, int]:
        """seq_id -> row of ``device_token_ids`` (built on first use: a steady decode step
        takes the rows as they are and never needs it)."""
        if self._row_of_seq is None:
            self._row_of_seq = {seq.seq_id: index for index, seq in enumerate(self.samplers)}
        return self._row_of_seq

    def finish_sampling(self) -> None:
        """Queue the sampling that ``launch`` deferred; a no-op when it sampled at once."""
        if self.deferred_sampling is not None:
            sample, self.deferred_sampling = self.deferred_sampling, None
            sample()

    def wait(self) -> StepResult:
        self.finish_sampling()
        if self.output is not None:
            host = self.output.to_host()
            self.result.token_ids = host.sampled_token_ids
            self.result.logprobs = host.sampled_logprobs
            self.result.top_logprobs = host.top_logprobs
            self.output = None
        return self.result


@dataclass
class _SteadyBatch:
    """What a decode step leaves for the next one when every row decoded one token and sampled.

    If the next batch holds the same sequences in the same order, each again with one token
    and no block copies, its inputs follow from these arrays by diffs: positions advance by
    one, and only rows that enter a new block change their table. That is the common step of
    a long decode, and it then costs O(rows that changed) in Python.
    """

    seqs: list[Sequence]
    positions: np.ndarray  # [rows] int64, the position each row computed
    tables: np.ndarray  # [rows, blocks] int32, zero-padded
    plain_greedy: bool  # every row passes is_plain_greedy
    masked_greedy: bool  # every row passes is_masked_greedy


def _decodes_first(batch: ScheduledBatch, block_tables: list[list[int]]) -> tuple[ScheduledBatch, list[list[int]]]:
    """The same batch with its one-token rows first (stable), so that attention can run them
    with the decode kernel as one contiguous block. Results are keyed by sequence, so the
    order is the runner's business only."""
    num_new = batch.num_new_tokens
    first_multi = next((row for row, n in enumerate(num_new) if n != 1), len(num_new))
    if all(n != 1 for n in num_new[first_multi:]):
        return batch, block_tables  # already ordered (or all decodes, or no decodes)
    order = [row for row, n in enumerate(num_new) if n == 1] + [row for row, n in enumerate(num_new) if n != 1]
    reordered = ScheduledBatch([batch.seqs[row] for row in order], [num_new[row] for row in order],
                               batch.block_copies, batch.num_preempted)
    return reordered, [block_tables[row] for row in order]


def _forking_now(seq: Sequence) -> list[Sequence]:
    """Siblings waiting to fork draw their first token from the parent's first-token logits
    (and only from those: with a step in flight the parent samples again before they fork)."""
    return seq.pending_forks if seq.num_output_tokens == 0 and seq.num_pending_tokens == 0 else []


def _needs_host_tokens(seq: Sequence) -> bool:
    """Its logits processing reads the tokens generated so far on the host: a grammar's state,
    bad words of several tokens, logits processors."""
    params = seq.params
    return seq.grammar is not None or bool(params.bad_words or params.logits_processors)


class ModelRunner:
    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, block_size: int,
                 eos_token_ids: frozenset[int], attention_backend: str = "auto") -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.backend = get_attention_backend(attention_backend, device)
        self.sampler = Sampler()
        self.bitmask_filler = BitmaskFiller(model.config.vocab_size, device)
        self.staging = InputStaging(device)
        self.attention_layers = model.attention_layers()
        self.kv_caches: list[torch.Tensor] = []
        self.decode_graphs: Optional[DecodeGraphs] = None
        self._steady: Optional[_SteadyBatch] = None
        first = self.attention_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        for layer in self.attention_layers:
            layer.backend = self.backend

    # ---- cache ---------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One ``[2, num_blocks, block_size, kv_heads, head_dim]`` tensor per layer."""
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in self.attention_layers]
        for layer, cache in zip(self.attention_layers, self.kv_caches):
            layer.kv_cache = cache

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> float:
        """Capture decode graphs (CUDA with the Triton backend only); returns the seconds it took."""
        if self.device.type != "cuda" or self.backend.name != "triton":
            return 0.0
        hidden_size = self.model.config.hidden_size
        self.decode_graphs = DecodeGraphs(self.model, self.device, max_num_seqs,
                                          -(-max_model_len // self.block_size), max_model_len, hidden_size,
                                          self.dtype)
        return self.decode_graphs.capture()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks before a sequence writes into its copy."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def profile_peak_activation_bytes(self, num_tokens: int, max_model_len: int, num_sample_rows: int) -> int:
        """Run a worst-case step on a scratch cache and report the activation peak."""
        seq_len = min(num_tokens, max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
        positions = np.concatenate([np.arange(n) for n in lengths])
        seq_index = np.repeat(np.arange(len(lengths)), lengths)
        slots = tables[seq_index, positions // self.block_size] * self.block_size + positions % self.block_size
        metadata, _ = self._metadata(starts, np.array(lengths), tables, slots)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(self.device), metadata)
        rows = hidden[: min(num_sample_rows, num_tokens)]
        logits = self.model.compute_logits(rows)
        torch.softmax(logits.float(), dim=-1).sort(dim=-1)  # the sampler's worst case: a full-vocab sort
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self.kv_caches = []
        for layer in self.attention_layers:
            layer.kv_cache = None
        torch.cuda.empty_cache()
        return peak

    # ---- one step ------------------------------------------------------------------------
    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """Host -> device without waiting: through pinned memory on CUDA, since a copy from
        pageable memory may wait for the stream, and the stream is busy with the previous step."""
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    def _metadata(self, query_start: np.ndarray, seq_lens: np.ndarray, tables: np.ndarray, slots: np.ndarray,
                  extra: tuple[np.ndarray, ...] = ()) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """The attention metadata, uploaded together with the step's ``extra`` arrays in one copy;
        returns it and the extra arrays' device tensors."""
        query_lens = np.diff(query_start)
        # Length of the leading run of one-token rows (launch puts decodes first).
        not_single = query_lens != 1
        num_decodes = int(np.argmax(not_single)) if not_single.any() else len(query_lens)
        arrays = [query_start.astype(np.int32), seq_lens.astype(np.int32), tables.astype(np.int32, copy=False),
                  slots.astype(np.int64, copy=False), *extra]
        mixed = 0 < num_decodes < len(query_lens)
        if mixed:
            # Own tensors rather than views at an offset: Triton specialises on pointer
            # alignment, and views would recompile the prefill kernel as num_decodes varies.
            arrays += [query_start[num_decodes:].astype(np.int32) - num_decodes,
                       seq_lens[num_decodes:].astype(np.int32), tables[num_decodes:].astype(np.int32, copy=False)]
        device = self.staging.upload(arrays)
        prefill = PrefillPart(query_start_loc=device[-3], seq_lens=device[-2], block_tables=device[-1]) if mixed else None
        metadata = AttentionMetadata(
            num_decodes=num_decodes,
            prefill=prefill,
            query_start_loc=device[0],
            seq_lens=device[1],
            block_tables=device[2],
            slot_mapping=device[3],
            max_query_len=int(query_lens.max()) if len(query_lens) else 0,
            max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
            query_start_loc_cpu=query_start.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return metadata, device[4:4 + len(extra)]

    def prepare_inputs(self, batch: ScheduledBatch, block_tables: list[list[int]],
                       previous: Optional[LaunchedStep] = None) -> ModelInputs:
        """Flatten the batch. A token still on the device (sampled by ``previous``, which is in
        flight) is filled in on the device from ``previous.device_token_ids``."""
        num_seqs = len(batch.seqs)
        query_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        computed = np.array([seq.num_computed_tokens for seq in batch.seqs], dtype=np.int64)
        seq_lens = computed + query_lens

        # Ragged tables -> one padded array, filled in a single vectorised assignment.
        table_lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)
        tables = np.zeros((num_seqs, int(table_lens.max())), dtype=np.int32)
        tables[np.arange(tables.shape[1]) < table_lens[:, None]] = np.fromiter(
            chain.from_iterable(block_tables), dtype=np.int32, count=int(table_lens.sum()))

        # positions: computed[b] + 0..query_len[b]-1, laid out flat
        seq_index = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(query_start[-1]) - query_start[seq_index] + computed[seq_index]
        slots = tables[seq_index, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size

        # A pending token is always the last (and only) token its sequence runs this step.
        pending_at: list[int] = []  # flat positions
        pending_from: list[int] = []  # rows of previous.device_token_ids
        if num_seqs and int(query_lens.max()) == 1:
            input_ids = [seq.token_ids[c] if c < len(seq.token_ids) else -1
                         for seq, c in zip(batch.seqs, computed.tolist())]
            if -1 in input_ids:
                pending_at = [row for row, token in enumerate(input_ids) if token == -1]
        else:
            input_ids = []
            for seq, c, n in zip(batch.seqs, computed.tolist(), query_lens.tolist()):
                chunk = seq.token_ids[c : c + n]
                if len(chunk) < n:
                    pending_at.append(len(input_ids) + len(chunk))
                    chunk = chunk + [-1]
                input_ids.extend(chunk)
        sample_rows = [row for row, seq in enumerate(batch.seqs) if seq_lens[row] == seq.num_tokens]
        sample_indices = query_start[1:][sample_rows] - 1
        metadata, (input_ids_device, positions_device, sample_indices_device) = self._metadata(
            query_start, seq_lens, tables, slots,
            (np.array(input_ids, dtype=np.int64), positions.astype(np.int64, copy=False),
             sample_indices.astype(np.int64, copy=False)))
        if pending_at:
            if previous is None or previous.device_token_ids is None:
                raise RuntimeError("a sequence has a pending token but no step is in flight")
            row_of_seq = previous.row_of_seq()
            pending_from = [row_of_seq[batch.seqs[int(seq_index[flat])].seq_id] for flat in pending_at]
            at = self._upload(torch.tensor(pending_at, dtype=torch.long))
            source = self._upload(torch.tensor(pending_from, dtype=torch.long))
            input_ids_device[at] = previous.device_token_ids[source]

        return ModelInputs(
            input_ids=input_ids_device,
            positions=positions_device,
            metadata=metadata,
            sample_seqs=[batch.seqs[row] for row in sample_rows],
            sample_indices=sample_indices_device,
            host_positions=positions,
            host_tables=tables,
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                num_seqs: int) -> torch.Tensor:
        """The model's hidden states for a flat batch, through a decode graph where one fits
        (tensor-parallel ranks mirror this call: every rank picks the same path)."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(num_seqs, metadata):
            return graphs.run(input_ids, positions, metadata)
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """Logits of the given rows of the hidden states."""
        return self.model.compute_logits(hidden[rows])

    def _steady_inputs(self, batch: ScheduledBatch, block_tables: SequenceOf[list[int]],
                       previous: Optional[LaunchedStep]) -> Optional[ModelInputs]:
        """The inputs of a steady decode step (see ``_SteadyBatch``), or None if this is not one."""
        steady = self._steady
        seqs = batch.seqs
        if (steady is None or batch.block_copies or batch.num_tokens != len(seqs) or seqs != steady.seqs
                or (previous is not None and previous.samplers != seqs)):
            return None
        num_seqs = len(seqs)
        positions = steady.positions + 1
        block_index = positions // self.block_size
        tables = steady.tables
        grown = np.flatnonzero(positions % self.block_size == 0)  # rows whose token opens a new block
        if len(grown):
            width = int(block_index[grown].max()) + 1
            # A new array, not an update in place: the last step's upload may still read this one.
            tables = np.pad(tables, ((0, 0), (0, max(0, width - tables.shape[1]))))
            for row in grown.tolist():
                tables[row, block_index[row]] = block_tables[row][block_index[row]]
        rows = np.arange(num_seqs)
        slots = tables[rows, block_index].astype(np.int64) * self.block_size + positions % self.block_size
        extra = (positions, rows)
        if previous is None:
            extra += (np.array([seq.token_ids[-1] for seq in seqs], dtype=np.int64),)
        query_start = np.arange(num_seqs + 1, dtype=np.int64)
        self._steady = _SteadyBatch(seqs, positions, tables, steady.plain_greedy, steady.masked_greedy)
        metadata, uploaded = self._metadata(query_start, positions + 1, tables, slots, extra)
        return ModelInputs(
            # with a step in flight, every row's input is its token still there
            input_ids=previous.device_token_ids if previous is not None else uploaded[2],
            positions=uploaded[0],
            metadata=metadata,
            sample_seqs=seqs,
            sample_indices=uploaded[1],
        )

    def _keep_steady(self, batch: ScheduledBatch, inputs: ModelInputs, samplers: list[Sequence],
                     masked_greedy: bool) -> None:
        """Keep a decode step's arrays for the next step's diffs, if every row decoded and sampled
        (``masked_greedy``: every sampler passes ``is_masked_greedy``)."""
        self._steady = None
        num_seqs = len(batch.seqs)
        if (batch.num_tokens != num_seqs or len(samplers) != num_seqs or len(inputs.sample_seqs) != num_seqs
                or inputs.host_tables is None):
            return
        # Grammars, biases, watermarks and processors keep the steady inputs too; they take the
        # full sampler, or the masked argmax for greedy rows with only a grammar (and may defer
        # it, see ``launch``).
        self._steady = _SteadyBatch(list(batch.seqs), inputs.host_positions, inputs.host_tables,
                                    all(is_plain_greedy(seq.params) and seq.grammar is None for seq in samplers),
                                    masked_greedy)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> StepResult:
        """Run one step to completion."""
        return self.launch(batch, block_tables).wait()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, block_tables: list[list[int]],
               previous: Optional[LaunchedStep] = None) -> LaunchedStep:
        """Queue one step on the device and return without waiting for its tokens
        (prompt logprobs, when asked for, are gathered synchronously)."""
        self.copy_blocks(batch.block_copies)
        inputs = self._steady_inputs(batch, block_tables, previous)
        if inputs is not None:
            return self._launch_steady(inputs, previous)
        batch, block_tables = _decodes_first(batch, block_tables)
        inputs = self.prepare_inputs(batch, block_tables, previous)
        hidden = self._forward(inputs)
        launched = LaunchedStep(StepResult())
        self._prompt_logprobs(batch, inputs, hidden, launched.result)
        if not inputs.sample_seqs:
            self._steady = None
            return launched
        logits = self.compute_logits(hidden, inputs.sample_indices)
        # Siblings about to fork draw their first token from the parent's logits row.
        samplers = [member for seq in inputs.sample_seqs for member in [seq, *_forking_now(seq)]]
        fork_rows = None  # row of inputs.sample_seqs that each sampler draws from
        if len(samplers) > len(inputs.sample_seqs):
            rows = [row for row, seq in enumerate(inputs.sample_seqs) for _ in range(1 + len(_forking_now(seq)))]
            fork_rows = self._upload(torch.tensor(rows))
            logits = logits.index_select(0, fork_rows)
        launched.samplers = samplers
        # A row whose logits depend on the host's view of its tokens (a grammar's state, ...)
        # cannot sample before the step in flight has been processed. The forward pass is
        # queued already, so the engine processes that step while the device computes this
        # one and then calls ``finish_sampling``: the mask is filled on the CPU meanwhile.
        masked_greedy = all(is_masked_greedy(seq.params) for seq in samplers)
        if previous is not None and any(map(_needs_host_tokens, samplers)):
            launched.deferred_sampling = lambda: self._sample(launched, inputs, logits, fork_rows, 1, masked_greedy)
        else:
            self._sample(launched, inputs, logits, fork_rows, 0, masked_greedy)
        self._keep_steady(batch, inputs, samplers, masked_greedy)
        return launched

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        return self.forward(inputs.input_ids, inputs.positions, inputs.metadata, len(inputs.metadata.seq_lens_cpu))

    @torch.inference_mode()
    def _sample(self, launched: LaunchedStep, inputs: ModelInputs, logits: torch.Tensor,
                fork_rows: Optional[torch.Tensor], num_launched_pending: int, masked_greedy: bool) -> None:
        """Sample the step's rows and queue the copy of the tokens to the host.

        ``num_launched_pending`` is 1 when sampling was deferred: the engine has then already
        counted this step's own token as pending in every sampler. ``masked_greedy``: every
        sampler passes ``is_masked_greedy``.
        """
        samplers = launched.samplers
        if masked_greedy:
            # Greedy rows whose only control is a grammar: mask, then argmax (the common
            # structured-output request), without building a sampling row per sequence.
            constrained, grammars = constrained_rows(samplers)
            bitmask = self.bitmask_filler.fill(grammars, constrained, len(samplers)) if constrained else None
            output = self.sampler.sample_masked_greedy(logits, bitmask)
            launched.device_token_ids = output.sampled_token_ids
            output.start_copy()
            launched.output = output
            return
        rows = [
            SamplingRow(
                params=seq.params,
                token_ids=seq.token_ids,
                num_prompt_tokens=seq.num_prompt_tokens,
                generator=seq.generator,
                eos_token_ids=self.eos_token_ids,
                num_pending_tokens=seq.num_pending_tokens - num_launched_pending,
            )
            for seq in samplers
        ]
        constrained, grammars = constrained_rows(samplers)
        bitmask = self.bitmask_filler.fill(grammars, constrained, len(rows)) if constrained else None
        penalize_pending = any(seq.num_pending_tokens > num_launched_pending and has_penalty(seq.params)
                               for seq in samplers)
        watermark = any(seq.params.watermark for seq in samplers)
        newest = self._newest_tokens(inputs, fork_rows) if penalize_pending or watermark else None
        pending_output_tokens = None
        if penalize_pending:
            pending = self._upload(torch.tensor([seq.num_pending_tokens > num_launched_pending for seq in samplers]))
            pending_output_tokens = torch.where(pending, newest, -1)
        output = self.sampler.sample(logits, rows, pending_output_tokens, bitmask, newest if watermark else None)
        launched.device_token_ids = output.sampled_token_ids
        output.start_copy()
        launched.output = output

    def _launch_steady(self, inputs: ModelInputs, previous: Optional[LaunchedStep]) -> LaunchedStep:
        """``launch`` for a steady decode step: one sampling row per sequence, in batch order."""
        hidden = self._forward(inputs)
        logits = self.compute_logits(hidden, inputs.sample_indices)
        samplers = inputs.sample_seqs
        positions = self._steady.positions
        full_block_rows = np.flatnonzero((positions + 1) % self.block_size == 0).tolist()
        launched = LaunchedStep(StepResult(), samplers, steady=True, full_block_rows=full_block_rows)
        if not self._steady.plain_greedy:
            masked_greedy = self._steady.masked_greedy
            if previous is not None and any(map(_needs_host_tokens, samplers)):  # as in ``launch``
                launched.deferred_sampling = lambda: self._sample(launched, inputs, logits, None, 1, masked_greedy)
            else:
                self._sample(launched, inputs, logits, None, 0, masked_greedy)
            return launched
        output = self.sampler.sample_plain_greedy(logits)
        launched.device_token_ids = output.sampled_token_ids
        output.start_copy()
        launched.output = output
        return launched

    def _newest_tokens(self, inputs: ModelInputs, fork_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Each sampling row's newest token, on the device: its input this step. With a step in
        flight it may not have reached the host yet (penalties, watermark seeds need it)."""
        newest = inputs.input_ids[inputs.sample_indices]
        return newest.index_select(0, fork_rows) if fork_rows is not None else newest

    def _prompt_logprobs(self, batch: ScheduledBatch, inputs: ModelInputs, hidden: torch.Tensor,
                         result: StepResult) -> None:
        """Logprobs of prompt token ``p + 1`` given tokens ``..p``, for positions run this step."""
        starts = inputs.metadata.query_start_loc_cpu
        for row, seq in enumerate(batch.seqs):
            if seq.params.prompt_logprobs is None or seq.prompt_logprobs is None:
                continue
            first = max(seq.num_computed_tokens, len(seq.prompt_logprobs) - 1)
            last = min(seq.num_computed_tokens + batch.num_new_tokens[row], seq.num_prompt_tokens - 1)
            if first >= last:
                continue
            offset = starts[row] - seq.num_computed_tokens
            entries: list[dict[int, tuple[float, int]]] = []
            # Full-vocabulary logits for a whole chunk would not fit the profiled memory: go in slices.
            for begin in range(first, last, _PROMPT_LOGPROBS_ROWS):
                end = min(begin + _PROMPT_LOGPROBS_ROWS, last)
                logits = self.compute_logits(hidden, slice(offset + begin, offset + end))
                targets = torch.tensor(seq.token_ids[begin + 1 : end + 1], device=self.device)
                entries += compute_prompt_logprobs(logits, targets, seq.params.prompt_logprobs)
            result.prompt_logprobs[seq.seq_id] = entries
