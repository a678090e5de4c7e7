"""Decode steps with static shapes, replayed as CUDA graphs.

A decode step launches about 30 kernels per layer (28 layers) for a handful of tokens; at batch 1 on an H200
the launches alone take longer than reading the weights. So steps in which every sequence decodes one token
(and none takes image embeddings) run through a fixed-shape forward whose inputs live in static buffers:

* the batch is padded to a **batch bucket** (1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to ``max_num_seqs``); the
  padding rows decode token 0 at position 0 into the pool's **scratch block** (``KVPool.scratch_block``: never
  handed to a sequence), so they write nothing any sequence reads;
* with the **paged kernel** (``paged``: the Triton backend, triton_attention.py) the block tables live in a
  static ``[max batch, max blocks]`` buffer and the kernel reads each row's used blocks in place: **one graph
  per batch bucket** serves every context up to ``max_context`` (the model's length), and a step uploads only
  the columns its longest table uses;
* without it (the **gather** fallback, where the kernel is not usable), keys are gathered over a **context
  bucket**: the batch's longest context rounded up to a power of two of blocks (at least ``MIN_CONTEXT``), a
  key past a sequence's own context masked out; one graph per (batch bucket, context bucket). Attention there
  treats the 7 query heads that share a KV head as 7 query rows of that head (one SDPA call, no
  ``enable_gqa``, no repeated K/V), which lets torch pick its fused kernels with a mask.

Every graph is captured once at start-up (all share one memory pool: ``pool_bytes``) and replayed with one
copy of the step's ids, positions and block tables into the buffers. Steps with a prefill chunk, image
embeddings, more sequences than the largest bucket or a longer context run eagerly. On the CPU the same
static forward runs without capture (``capture=False``; the paged kernel under Triton's interpreter): that is
how the suite checks, against the eager path, the arithmetic the graphs replay.

Capture runs with this instance's GPU current and Python's cycle collector paused (``collector_paused``); the
graphs call the runner's forward through a weak reference, so that runner and graphs form no reference cycle
(a dropped engine is freed at once, not by a later collection that could land in another engine's capture).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from minicpmv.engine import staging
from minicpmv.engine.attention import gqa_decode_attention

logger = logging.getLogger(__name__)

MIN_CONTEXT = 256  # tokens: the smallest context bucket

_pause_lock = threading.RLock()  # re-entrant: a finalizer run by the collection may capture too
_pauses = 0  # collector_paused blocks open now (captures on several threads)
_enabled_before = False  # whether the collector was on when the first of them opened


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """One garbage collection now, then Python's cycle collector off until the block ends (back on only if it
    was on before; nested or concurrent blocks: when the last one ends).

    For CUDA graph capture: a collection during a capture that frees a CUDA graph or CUDA memory (say, of an
    engine dropped earlier and kept by a reference cycle) makes CUDA calls a capturing stream forbids, and the
    capture fails ("operation not permitted when stream is capturing"). torch.cuda.graph collected before
    capturing up to torch 2.8; from 2.9 it does not. The collector is process-wide, so this holds on every
    thread, as a capture needs (its default mode forbids those calls from any thread). No collection starts
    while another block is open: it could free memory during that block's capture."""
    global _pauses, _enabled_before
    with _pause_lock:
        if _pauses == 0:
            gc.collect()
            _enabled_before = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _enabled_before:
                gc.enable()


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 32, then of 16: small steps where decoding is fastest, and up to
    ``max_num_seqs`` (always included)."""
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size = size * 2 if size < 8 else size + (8 if size < 32 else 16)
    return [*sizes, max_num_seqs]


def context_buckets(block_size: int, max_context: int) -> list[int]:
    """Context widths in blocks: powers of two from ``MIN_CONTEXT`` tokens up to ``max_context`` tokens."""
    blocks, widths = max(1, -(-MIN_CONTEXT // block_size)), []
    limit = -(-max_context // block_size)
    while blocks < limit:
        widths.append(blocks)
        blocks *= 2
    return [*widths, limit]


@dataclass
class StaticDecodeMetadata:
    """What ``ModelRunner._layers`` needs of a static decode step: every tensor a view of a static buffer or
    computed from one inside the step, so a captured graph sees the next step's values."""

    slot_mapping: torch.Tensor  # [B]
    slots: torch.Tensor  # [B, K]
    mask: torch.Tensor  # [B, 1, 1, K]
    lora_slots: torch.Tensor | None = None  # [B] each row's LoRA slot (-1: none)


@dataclass
class StaticPagedMetadata:
    """A static decode step's metadata for the paged kernel (triton_attention.py): views of static buffers."""

    slot_mapping: torch.Tensor  # [B]
    block_table: torch.Tensor  # [B, max blocks]
    seq_lens: torch.Tensor  # [B]
    cu_q: torch.Tensor  # [B + 1] = 0..B
    decode_tiles: torch.Tensor  # [B, 2] = (b, 0)
    block_size: int
    num_splits: int  # fixed per batch size (DecodeGraphs.splits)
    prefill_tiles: None = None
    fresh: None = None
    lora_slots: torch.Tensor | None = None  # [B] each row's LoRA slot (-1: none)


class StaticDecodeAttention:
    name = "static-decode"

    def __call__(self, q, k, v, keys, values, meta: StaticDecodeMetadata) -> torch.Tensor:
        return gqa_decode_attention(q, keys[meta.slots], values[meta.slots], meta.mask)


class DecodeGraphs:
    """Static buffers and, on CUDA, one captured graph per batch bucket (paged kernel) or per (batch bucket,
    context bucket) (gather).

    ``forward(embed_ids, positions, meta)`` is the runner's model forward (embeddings, layers, final norm,
    lm_head) returning float32 logits [B, V]; it must only launch device work (no host sync); ``meta`` is a
    ``StaticPagedMetadata`` with ``paged`` (the runner then attends with ``paged``), else a
    ``StaticDecodeMetadata``. A bound method is held weakly (the runner owns these graphs: a strong reference back
    would be a cycle). ``paged`` decides how many key ranges a batch's decode splits into (fixed per graph).
    """

    def __init__(self, forward: Callable, *, block_size: int, scratch_block: int, max_num_seqs: int,
                 max_context: int, device: torch.device, capture: bool, paged=None):  # fmt: skip
        self._forward = weakref.WeakMethod(forward) if inspect.ismethod(forward) else (lambda: forward)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.paged = paged
        self.batch_sizes = batch_buckets(max_num_seqs)
        max_blocks = -(-max_context // block_size)
        self.widths = [max_blocks] if paged is not None else context_buckets(block_size, max_context)
        self.max_context = self.widths[-1] * block_size
        max_batch, max_width = self.batch_sizes[-1], self.widths[-1]
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.lora_slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)  # padding rows: none
        self.tables = torch.full((max_batch, max_width), scratch_block, dtype=torch.long, device=device)
        if paged is not None:
            rows = torch.arange(max_batch + 1, device=device)
            self._cu_q = rows  # one new token per row
            self._tiles = torch.stack([rows[:max_batch], torch.zeros_like(rows[:max_batch])], dim=1)  # (row, 0)
            self.splits = {b: paged.splits(b, self.max_context) for b in self.batch_sizes}
        else:
            self._offsets = torch.arange(block_size, device=device)
            self._keys = torch.arange(max_width * block_size, device=device)
        self.logits: torch.Tensor | None = None  # [max batch, V]: every graph writes its logits here
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.pool_bytes = 0  # GPU memory the capture reserved (the graphs' shared pool)
        self.num_steps = 0  # decode steps that took this path
        self.num_replays = 0  # of which replayed as a graph
        if capture:
            try:
                self._capture_all()
            except Exception as e:  # noqa: BLE001 (a kernel that can't be captured: run these steps eagerly)
                self.graphs.clear()
                logger.warning("CUDA graphs: capture failed (%s: %s); decode steps run eagerly", type(e).__name__, e)

    # ---------------------------------------------------------------- the step

    def _static_forward(self, batch: int, width: int) -> torch.Tensor:
        ids, positions, tables = self.ids[:batch], self.positions[:batch], self.tables[:batch, :width]
        if self.paged is not None:
            blocks = tables.gather(1, (positions // self.block_size)[:, None])[:, 0]
            meta = StaticPagedMetadata(blocks * self.block_size + positions % self.block_size, tables, positions + 1,
                                       self._cu_q[: batch + 1], self._tiles[:batch], self.block_size,
                                       self.splits[batch], lora_slots=self.lora_slots[:batch])  # fmt: skip
        else:
            slots = (tables[:, :, None] * self.block_size + self._offsets).view(batch, -1)  # [B, K]
            rows = torch.arange(batch, device=self.device)
            mask = (self._keys[: width * self.block_size][None, :] <= positions[:, None])[:, None, None, :]
            meta = StaticDecodeMetadata(slots[rows, positions], slots, mask, self.lora_slots[:batch])
        forward = self._forward()
        if forward is None:
            raise RuntimeError("the model runner of these CUDA graphs is gone")
        return forward(ids, positions, meta)

    def bucket(self, num_seqs: int, max_context_len: int) -> tuple[int, int] | None:
        """The smallest (batch, width in blocks) holding this step; None if no bucket does."""
        if num_seqs > self.batch_sizes[-1] or max_context_len > self.max_context:
            return None
        blocks = -(-max_context_len // self.block_size)
        batch = next(b for b in self.batch_sizes if b >= num_seqs)
        width = next(w for w in self.widths if w >= blocks)
        return batch, width

    def run(self, ids: list[int], positions: list[int], block_tables: list[list[int]],
            lora_slots: list[int] | None = None) -> torch.Tensor | None:  # fmt: skip
        """Logits [n, V] for a decode step of n sequences (one token each, at ``positions``, with LoRA slots
        ``lora_slots``, -1 for none); None when no bucket holds it (the caller runs it eagerly). The logits are
        a view of the graph's output buffer, valid until the next step."""
        n = len(ids)
        bucket = self.bucket(n, max(positions) + 1)
        if bucket is None:
            return None
        batch, width = bucket
        self.num_steps += 1
        self._load(ids, positions, block_tables, batch, width, lora_slots)
        entry = self.graphs.get(bucket)
        if entry is None:  # not captured (the CPU, or a capture that failed): the same arithmetic, eagerly
            return self._static_forward(batch, width)[:n]
        entry.replay()
        self.num_replays += 1
        return self.logits[:n]

    def _load(self, ids, positions, block_tables, batch: int, width: int, lora_slots=None) -> None:
        """One host->device copy (pinned, non-blocking) of ids, positions and tables, built with NumPy; padding
        rows and columns point at the scratch block (padding rows decode token 0 at position 0 there)."""
        n = len(ids)
        step = np.zeros((3, batch), dtype=np.int64)
        step[0, :n] = ids
        step[1, :n] = positions
        step[2] = -1
        if lora_slots is not None:
            step[2, :n] = lora_slots
        used = np.zeros(batch, dtype=np.int64)
        used[:n] = step[1, :n] // self.block_size + 1
        if self.paged is not None:
            width = int(used.max())  # the kernel reads no column past a row's own blocks: older ones may stay
        tables = [*block_tables, *[()] * (batch - n)]
        table = staging.padded_table(tables, used, width, self.scratch_block)
        staged, staged_table = staging.upload([step, table], self.device)
        self.ids[:batch].copy_(staged[0])
        self.positions[:batch].copy_(staged[1])
        self.lora_slots[:batch].copy_(staged[2])
        self.tables[:batch, :width].copy_(staged_table)

    # ---------------------------------------------------------------- capture

    def _capture_all(self) -> None:
        # Graphs belong to the device current at capture (this instance's); no collection may run meanwhile.
        with staging.device_scope(self.device), collector_paused():
            self._capture_on_device()

    def _capture_on_device(self) -> None:
        start = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.device)
        pool = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # Largest first: later, smaller graphs reuse the memory the first one's pool reserved.
        for batch in reversed(self.batch_sizes):
            for width in reversed(self.widths):
                self.tables[:batch, :width].fill_(self.scratch_block)
                self.ids[:batch].zero_()
                self.positions[:batch].zero_()
                self.lora_slots[:batch].fill_(-1)
                with torch.cuda.stream(stream):
                    warm = self._static_forward(batch, width)  # warm-up: lazy inits, kernel selection
                    if self.logits is None:  # the largest batch comes first
                        self.logits = torch.empty_like(warm)
                    del warm
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[:batch].copy_(self._static_forward(batch, width))
                pool = graph.pool()
                self.graphs[(batch, width)] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved
        logger.info("CUDA graphs: %d captured (batch %s x context %s tokens, %s) in %.1f s, %.0f MiB", len(self.graphs),
                    self.batch_sizes, [w * self.block_size for w in self.widths],
                    "paged kernel" if self.paged is not None else "gather", self.capture_seconds,
                    self.pool_bytes / 2**20)  # fmt: skip
