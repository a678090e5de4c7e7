"""Attention over the paged KV pool, behind one small interface, for a packed step.

A step is packed: the new tokens of every scheduled sequence (one for a decoding sequence, a chunk for a
prefilling one) are concatenated, with no padding across sequences, ``[T, heads, head_dim]``. Sequence ``b``
brings ``query_lens[b]`` new tokens and, after them, has ``context_lens[b]`` tokens of KV in the pool; its new
tokens sit at the end of its context (causal, aligned to the bottom right).

Backends (``attention_backend`` picks one; "auto" = on CUDA the faster of the two, timed at start-up, varlen only
if it passes a self-test; on the CPU the reference):
* ``ReferenceAttention``: SDPA over the sequence's blocks gathered from the pool. Decoding sequences go in one
  batched call (keys padded to the longest context and masked); each prefill chunk in a call of its own (a
  first chunk without cached prefix uses its own keys, causal, with no gather). Exact in float32; the CPU path.
* ``VarlenAttention``: FlashAttention-2 variable-length attention (``torch.nn.attention.varlen``, CUDA, shipped
  with torch: no extra build) over the gathered contexts of all sequences in one call. torch's paged mode
  (``block_table``) needs FlashAttention-3 kernels that torch does not ship, hence the gather.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Where a packed step's tokens go and what they see; built once per step, used by every layer.

    Built with a fixed number of tensor operations whatever the batch (no per-sequence tensors), since at 64
    sequences per-sequence work here was a millisecond of every step's host time.
    """

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    slots: torch.Tensor  # [B, W] pool slots of each sequence's blocks, in order (past its context: padding)
    decode_rows: torch.Tensor | None = None  # token index of each single-token sequence
    decode_slots: torch.Tensor | None = None  # [Bd, Wd] their slots (Wd: their longest context, in blocks)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, Wd] True = a real key
    prefills: list[tuple[int, int, int, int]] = field(default_factory=list)  # (seq, token start, q_len, ctx)
    _varlen: tuple | None = None  # (packed context slots, cu_seq_q, cu_seq_k, max_q, max_k), built on demand

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device) -> AttentionMetadata:  # fmt: skip
        widths = [-(-ctx // block_size) for ctx in context_lens]
        width = max(widths)
        rows = [table[:w] + [0] * (width - w) for table, w in zip(block_tables, widths, strict=True)]
        table = torch.tensor(rows, dtype=torch.long, device=device)
        slots = (table[:, :, None] * block_size + torch.arange(block_size, device=device)).view(len(rows), -1)
        seq_index, positions, starts, decode = [], [], [], []
        total = 0
        for b, (q, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
            seq_index.extend([b] * q)
            positions.extend(range(ctx - q, ctx))
            starts.append(total)
            total += q
            if q == 1:
                decode.append(b)
        slot_mapping = slots[torch.tensor(seq_index, device=device), torch.tensor(positions, device=device)]
        meta = cls(query_lens, context_lens, slot_mapping, slots)
        if decode:
            index = torch.tensor(decode, dtype=torch.long, device=device)
            lengths = torch.tensor([context_lens[b] for b in decode], device=device)
            meta.decode_rows = torch.tensor([starts[b] for b in decode], dtype=torch.long, device=device)
            # Only as wide as the longest decoding context: a long prompt prefilled in the same step must not
            # make every decoding sequence gather (and mask) its whole width.
            width_decode = max(widths[b] for b in decode) * block_size
            meta.decode_slots = slots[:, :width_decode].index_select(0, index)
            keys = torch.arange(width_decode, device=device)
            meta.decode_mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
        meta.prefills = [(b, starts[b], q, context_lens[b]) for b, q in enumerate(query_lens) if q != 1]
        return meta

    def context_slots(self, b: int) -> torch.Tensor:
        """Sequence ``b``'s whole context, in order: [context_len] pool slots."""
        return self.slots[b, : self.context_lens[b]]

    def varlen_inputs(self) -> tuple:
        if self._varlen is None:
            device = self.slot_mapping.device
            lengths = torch.tensor(self.context_lens, device=device)
            packed = self.slots[torch.arange(self.slots.shape[1], device=device)[None, :] < lengths[:, None]]
            cu_q = torch.tensor([0, *self.query_lens], device=device).cumsum(0, dtype=torch.int32)
            cu_k = torch.tensor([0, *self.context_lens], device=device).cumsum(0, dtype=torch.int32)
            self._varlen = (packed, cu_q, cu_k, max(self.query_lens), max(self.context_lens))
        return self._varlen


def gqa_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One new token per sequence: ``q`` [B, Hq, D], gathered ``keys``/``values`` [B, K, Hk, D], ``mask``
    [B, 1, 1, K] (True = a real key) -> [B, Hq, D]. Query head h reads KV head h // (Hq / Hk), as GQA does;
    the heads of one group are the query rows of one SDPA head."""
    batch, heads, dim = q.shape
    kv_heads = keys.shape[2]
    query = q.view(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(query, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)
    return out.reshape(batch, heads, dim)


class ReferenceAttention:
    name = "reference"
    timings_ms: dict[str, float] | None = None  # set when chosen by timing (select_backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        """``q`` [T, Hq, D], the step's ``k``/``v`` [T, Hk, D] (already stored), the layer's pool ``keys``/``values``
        [slots, Hk, D] -> [T, Hq, D]."""
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            query = q.index_select(0, meta.decode_rows)
            key, value = keys[meta.decode_slots], values[meta.decode_slots]  # [Bd, Kmax, Hk, D]
            out.index_copy_(0, meta.decode_rows, gqa_decode_attention(query, key, value, meta.decode_mask))
        for b, start, length, ctx in meta.prefills:
            query = q[start : start + length].transpose(0, 1)[None]  # [1, Hq, q, D]
            if ctx == length:  # nothing cached before this chunk: its own keys, plain causal
                key = k[start : start + length].transpose(0, 1)[None]
                value = v[start : start + length].transpose(0, 1)[None]
                result = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
            else:
                slots = meta.context_slots(b)
                key, value = keys[slots].transpose(0, 1)[None], values[slots].transpose(0, 1)[None]
                rows = torch.arange(length, device=q.device)[:, None] + (ctx - length)
                mask = torch.arange(ctx, device=q.device)[None, :] <= rows  # bottom-right causal
                result = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
            out[start : start + length] = result[0].transpose(0, 1)
        return out


class VarlenAttention:
    name = "varlen"
    timings_ms: dict[str, float] | None = None

    def __init__(self):
        from torch.nn.attention.varlen import varlen_attn  # ImportError where this torch has none

        self._fn = varlen_attn
        params = inspect.signature(varlen_attn).parameters
        # torch 2.13 spells causal as window_size=(-1, 0); earlier releases had is_causal. Detected, not assumed.
        if "window_size" in params:
            self._causal = {"window_size": (-1, 0)}
        elif "is_causal" in params:
            self._causal = {"is_causal": True}
        else:
            raise RuntimeError("varlen_attn takes neither window_size nor is_causal")
        self._gqa = "enable_gqa" in params

    def __call__(self, q, k, v, keys, values, meta: AttentionMetadata) -> torch.Tensor:
        slots, cu_q, cu_k, max_q, max_k = meta.varlen_inputs()
        key, value = keys.index_select(0, slots), values.index_select(0, slots)
        extra = dict(self._causal)
        if self._gqa:
            extra["enable_gqa"] = True
        elif key.shape[1] != q.shape[1]:
            repeat = q.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        return self._fn(q, key, value, cu_q, cu_k, max_q, max_k, **extra)


def select_backend(name: str, device: torch.device, dtype: torch.dtype):
    """The backend ``name`` asks for ("auto", "reference", "varlen"). "auto" on CUDA tries varlen: it must
    import and agree with the reference on a self-test (mixed decode and prefill, cached prefix, GQA); then the
    faster of the two on a step of MiniCPM-V's shape is taken (measured here, at start-up: torch's kernels
    differ by version and GPU, so nothing is assumed). The choice and the timings are logged and kept on the
    backend (``timings_ms``)."""
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return ReferenceAttention()
    if name not in ("auto", "varlen"):
        raise ValueError(f"unknown attention backend {name!r}; choose auto, reference or varlen")
    try:
        backend = VarlenAttention()
        error = _self_test(backend, device, dtype)
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        error = f"{type(e).__name__}: {e}"
    if error is not None:
        if name == "varlen":
            raise RuntimeError(f"attention backend 'varlen' is not usable here: {error}")
        logger.warning("attention: varlen is not usable here (%s); using the reference SDPA path", error)
        return ReferenceAttention()
    if name == "varlen":
        return backend
    try:
        chosen = fastest([backend, ReferenceAttention()], lambda b: _time_step(b, device, dtype))
    except Exception as e:  # noqa: BLE001 (timing is an optimisation: keep the validated kernel)
        logger.warning("attention: timing failed (%s); using varlen", e)
        return backend
    logger.info("attention: %s (step times %s ms)", chosen.name, chosen.timings_ms)
    return chosen


def fastest(backends: list, time_ms) -> Any:
    """The backend with the smallest ``time_ms(backend)``; every backend gets ``timings_ms`` (all of them)."""
    timings = {b.name: round(time_ms(b), 3) for b in backends}
    for b in backends:
        b.timings_ms = timings
    return min(backends, key=lambda b: timings[b.name])


def _time_step(backend, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Milliseconds of one layer's attention for a typical serving step: 32 decoding sequences with 1,024
    tokens of context and one 512-token prefill chunk after 1,536 cached tokens (28 query heads, 4 KV heads,
    head_dim 128)."""
    block_size, heads, kv_heads, dim = 16, 28, 4, 128
    query_lens = [1] * 32 + [512]
    context_lens = [1024] * 32 + [2048]
    per_seq = [-(-ctx // block_size) for ctx in context_lens]
    tables, next_block = [], 0
    for blocks in per_seq:
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    keys = torch.randn(next_block * block_size, kv_heads, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
    q = torch.randn(sum(query_lens), heads, dim, device=device, dtype=dtype)
    k, v = keys[meta.slot_mapping], values[meta.slot_mapping]
    backend(q, k, v, keys, values, meta)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        backend(q, k, v, keys, values, meta)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def _self_test(backend, device: torch.device, dtype: torch.dtype) -> str | None:
    generator = torch.Generator().manual_seed(0)
    block_size, heads, kv_heads, dim = 16, 28, 4, 128
    keys = torch.randn(64 * block_size, kv_heads, dim, generator=generator).to(device, dtype)
    values = torch.randn(64 * block_size, kv_heads, dim, generator=generator).to(device, dtype)
    query_lens, context_lens = [1, 5, 7, 1], [40, 5, 30, 17]
    tables = [[3, 9, 4], [10], [20, 21], [30, 31]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
    total = sum(query_lens)
    q = torch.randn(total, heads, dim, generator=generator).to(device, dtype)
    k, v = keys[meta.slot_mapping], values[meta.slot_mapping]
    expected = ReferenceAttention()(q, k, v, keys, values, meta).float()
    got = backend(q, k, v, keys, values, meta).float()
    error = float((got - expected).abs().max())
    return None if error < 2e-2 else f"self-test differs from the reference by {error:.3g}"
