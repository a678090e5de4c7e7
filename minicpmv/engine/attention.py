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
  (``block_table``) needs FlashAttention-3 kernels that torch does not ship, hence the gather. K/V go in with
  their own 4 heads where this torch lets them (see ``VarlenAttention``).

The step's metadata reaches the device in one non-blocking copy from pinned memory (staging.py), and nothing
here has a shape that depends on device data (no boolean-mask indexing): an eager step does not wait for the
GPU before its sampler does.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from minicpmv.engine import staging

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Where a packed step's tokens go and what they see; built once per step, used by every layer.

    Built on the host with NumPy, whatever the batch, and sent in one transfer (``staging.upload``): the
    step's ``positions`` and, when the runner passes them, its ``input_ids``, ``sample_rows`` and
    ``vision_rows`` travel in the same copy.
    """

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    slots: torch.Tensor | None  # [B, W] pool slots of each sequence's blocks, in order (past its context: padding)
    positions: torch.Tensor | None = None  # [T] position of each new token in its sequence
    decode_rows: torch.Tensor | None = None  # token index of each single-token sequence
    decode_slots: torch.Tensor | None = None  # [Bd, Wd] their slots (Wd: their longest context, in blocks)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, Wd] True = a real key
    prefills: list[tuple[int, int, int, int]] = field(default_factory=list)  # (seq, token start, q_len, ctx)
    input_ids: torch.Tensor | None = None  # [T] token ids (given to build)
    sample_rows: torch.Tensor | None = None  # [S] rows whose logits are sampled (given to build)
    vision_rows: torch.Tensor | None = None  # [R] rows that take image embeddings (given to build)
    cu_seqlens: torch.Tensor | None = None  # [2, B + 1] int64: cumulative query and context lengths
    _varlen: tuple | None = None  # (packed context slots, cu_seq_q, cu_seq_k, max_q, max_k), built on demand
    # Read by the paged kernels (triton_attention.py), built when ``build`` is given a ``tiling``:
    block_size: int = 0
    block_table: torch.Tensor | None = None  # [B, W] block ids (past a sequence's blocks: block 0, unread)
    seq_lens: torch.Tensor | None = None  # [B] context lengths
    decode_tiles: torch.Tensor | None = None  # [N, 2] (sequence, first new token): single-token sequences
    prefill_tiles: torch.Tensor | None = None  # [N, 2] tiles of the chunks the kernel takes
    fresh: tuple | None = None  # (rows [F], cu [G + 1], longest): prompts with nothing cached, left to varlen
    max_decode_context: int = 0  # the longest context among single-token sequences (host)
    lora_slots: torch.Tensor | None = None  # [T] each row's LoRA slot (-1: none), when the step has adapters
    lora_tiles: torch.Tensor | None = None  # [N, 3] the LoRA kernels' row segments (first row, rows, slot)

    @property
    def cu_q(self) -> torch.Tensor:
        """[B + 1] where each sequence's new tokens start in the packed step."""
        return self.cu_seqlens[0]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: Sequence[Sequence[int]],
              block_size: int, device: torch.device, *, input_ids: Sequence[int] | None = None,
              sample_rows: Sequence[int] | None = None, vision_rows: np.ndarray | None = None,
              tiling: Tiling | None = None, lora_slots: np.ndarray | None = None,
              lora_tiles: np.ndarray | None = None) -> AttentionMetadata:  # fmt: skip
        """``tiling``: the paged kernels' tile shapes (``TritonAttention.tiling``): their tiles are built and
        the gathers' slot tensors are not."""
        device = torch.device(device)
        q = np.asarray(query_lens, dtype=np.int64)
        ctx = np.asarray(context_lens, dtype=np.int64)
        batch = len(q)
        widths = -(-ctx // block_size)
        width = int(widths.max())
        table = staging.padded_table(block_tables, widths, width, 0)  # [B, W] blocks; padding: block 0
        cu = np.zeros((2, batch + 1), dtype=np.int64)
        np.cumsum(q, out=cu[0, 1:])
        np.cumsum(ctx, out=cu[1, 1:])
        starts, total = cu[0, :-1], int(cu[0, -1])
        seq = np.repeat(np.arange(batch), q)  # the sequence of each new token
        positions = np.arange(total, dtype=np.int64) + np.repeat(ctx - q - starts, q)
        slot_mapping = table[seq, positions // block_size] * block_size + positions % block_size
        decode = np.flatnonzero(q == 1)
        arrays = {"positions": positions, "slot_mapping": slot_mapping, "table": table, "cu": cu}
        if decode.size:
            arrays |= {"decode_rows": starts[decode], "decode_index": decode, "decode_lengths": ctx[decode]}
        optional = {"input_ids": input_ids, "sample_rows": sample_rows, "vision_rows": vision_rows,
                    "lora_slots": lora_slots, "lora_tiles": lora_tiles}  # fmt: skip
        arrays |= {name: np.asarray(value, dtype=np.int64) for name, value in optional.items() if value is not None}
        if tiling is not None:
            arrays |= tiling.arrays(q, ctx, starts)
        on_device = dict(zip(arrays, staging.upload(list(arrays.values()), device), strict=True))
        if tiling is not None:
            return cls._paged(query_lens, context_lens, block_size, on_device, q, ctx)

        offsets = torch.arange(block_size, device=device)
        slots = (on_device["table"][:, :, None] * block_size + offsets).view(batch, -1)
        meta = cls(list(query_lens), list(context_lens), on_device["slot_mapping"], slots, on_device["positions"],
                   input_ids=on_device.get("input_ids"), sample_rows=on_device.get("sample_rows"),
                   vision_rows=on_device.get("vision_rows"), cu_seqlens=on_device["cu"],
                   lora_slots=on_device.get("lora_slots"), lora_tiles=on_device.get("lora_tiles"))  # fmt: skip
        if decode.size:
            meta.decode_rows = on_device["decode_rows"]
            # Only as wide as the longest decoding context: a long prompt prefilled in the same step must not
            # make every decoding sequence gather (and mask) its whole width.
            width_decode = int(widths[decode].max()) * block_size
            meta.decode_slots = slots[:, :width_decode].index_select(0, on_device["decode_index"])
            keys = torch.arange(width_decode, device=device)
            meta.decode_mask = (keys[None, :] < on_device["decode_lengths"][:, None])[:, None, None, :]
        meta.prefills = [(b, int(starts[b]), int(q[b]), int(ctx[b])) for b in np.flatnonzero(q != 1).tolist()]
        return meta

    @classmethod
    def _paged(cls, query_lens, context_lens, block_size, on_device, q, ctx) -> AttentionMetadata:
        """The metadata of the paged kernels: no slot tensors, no gather."""
        decode = q == 1
        meta = cls(list(query_lens), list(context_lens), on_device["slot_mapping"], None, on_device["positions"],
                   input_ids=on_device.get("input_ids"), sample_rows=on_device.get("sample_rows"),
                   vision_rows=on_device.get("vision_rows"), cu_seqlens=on_device["cu"], block_size=block_size,
                   lora_slots=on_device.get("lora_slots"), lora_tiles=on_device.get("lora_tiles"),
                   block_table=on_device["table"], seq_lens=on_device["seq_lens"],
                   decode_tiles=on_device["decode_tiles"], prefill_tiles=on_device["prefill_tiles"],
                   max_decode_context=int(ctx[decode].max()) if decode.any() else 0)  # fmt: skip
        if "fresh_rows" in on_device:
            meta.fresh = (on_device["fresh_rows"], on_device["fresh_cu"], int(q[(q == ctx) & ~decode].max()))
        return meta

    def context_slots(self, b: int) -> torch.Tensor:
        """Sequence ``b``'s whole context, in order: [context_len] pool slots."""
        return self.slots[b, : self.context_lens[b]]

    def varlen_inputs(self) -> tuple:
        """(packed context slots [sum of contexts], cu_seq_q, cu_seq_k (int32), max_q, max_k). The packed slots
        are gathered with shapes known on the host (the total context length), so no device sync."""
        if self._varlen is None:
            device = self.slots.device
            total = sum(self.context_lens)
            cu_k = self.cu_seqlens[1]
            lengths = cu_k[1:] - cu_k[:-1]
            seq = torch.repeat_interleave(lengths, output_size=total)  # the sequence of each packed key
            offset = torch.arange(total, device=device) - cu_k.index_select(0, seq)
            packed = self.slots[seq, offset]
            cu_q, cu_k = self.cu_seqlens.to(torch.int32).unbind(0)
            self._varlen = (packed, cu_q, cu_k, max(self.query_lens), max(self.context_lens))
        return self._varlen


@dataclass(frozen=True)
class Tiling:
    """How the paged kernels cut a step into tiles (``decode_q``/``prefill_q`` new tokens per tile) and whether
    prompts with nothing cached go elsewhere (``fresh_elsewhere``: FlashAttention varlen over their own K/V)."""

    decode_q: int
    prefill_q: int
    fresh_elsewhere: bool = False

    def arrays(self, q: np.ndarray, ctx: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        """Host arrays of a step with ``q`` new tokens and ``ctx`` context per sequence (``starts``: where each
        sequence's tokens start): context lengths, the tiles, and the fresh prompts' rows."""
        decode = q == 1
        fresh = (q == ctx) & ~decode if self.fresh_elsewhere else np.zeros_like(decode)
        chunked = ~decode & ~fresh
        arrays = {"seq_lens": ctx, "decode_tiles": _tiles(np.flatnonzero(decode), q, 1),
                  "prefill_tiles": _tiles(np.flatnonzero(chunked), q, self.prefill_q)}  # fmt: skip
        if fresh.any():
            lengths = q[fresh]
            first = starts[fresh]
            arrays["fresh_rows"] = np.repeat(first - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            arrays["fresh_cu"] = np.concatenate([[0], np.cumsum(lengths)])
        return arrays


def _tiles(seqs: np.ndarray, q: np.ndarray, per_tile: int) -> np.ndarray:
    """[N, 2] (sequence, first new token) for the sequences ``seqs``, ``per_tile`` tokens a tile."""
    counts = -(-q[seqs] // per_tile)
    seq = np.repeat(seqs, counts)
    first = (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)) * per_tile
    return np.stack([seq, first], axis=1).astype(np.int64).reshape(-1, 2)


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


# A prefill chunk after cached tokens takes a boolean mask (bottom-right causal). Bytes of float32 scores one
# SDPA call of such a chunk may take if the kernel materializes them (the math kernel does): the chunk is
# split into query pieces under this bound.
SCORE_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class PrefillPlan:
    """How SDPA is called for a prefill chunk after cached tokens: ``repeat_kv``: K/V repeated to the query
    heads for this call (no ``enable_gqa``); ``rows``: query rows per call."""

    repeat_kv: bool
    rows: int


def prefill_plan(device_type: str, heads: int, length: int, context: int,
                 budget_bytes: int = SCORE_BUDGET_BYTES) -> PrefillPlan:  # fmt: skip
    """The call for ``length`` new tokens of ``heads`` query heads over ``context`` keys (the chunk's own last).

    On CUDA, SDPA with a mask and ``enable_gqa`` runs the math kernel (flash takes no mask, memory-efficient no
    GQA), which materializes heads x length x context float32 scores (28 x 2,048 x 30k: 7 GB) and K/V repeated
    anyway; with K/V repeated for this call only (28 x context x 128 x 2 x 2 bytes: 430 MB at 30k) and no
    ``enable_gqa``, the memory-efficient kernel takes the mask and materializes no scores. The CPU's flash
    kernel takes a mask with GQA: called as it is. On both, the query is split so that a kernel that does
    materialize scores stays under ``budget_bytes`` (one piece up to 1,170 tokens at 8k of context)."""
    rows = max(1, min(length, budget_bytes // (heads * context * 4)))
    return PrefillPlan(repeat_kv=device_type == "cuda", rows=rows)


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
    """A prefill chunk after cached tokens: ``q`` [L, Hq, D] over its sequence's whole context ``keys``/``values``
    [C, Hk, D] (the chunk's own tokens last), query i seeing keys j <= C - L + i -> [L, Hq, D]."""
    length, heads, _ = q.shape
    context, kv_heads, _ = keys.shape
    past = context - length
    key, value = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, Hk, C, D]
    gqa = kv_heads != heads
    if gqa and plan.repeat_kv:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        gqa = False
    pieces = []
    for first in range(0, length, plan.rows):
        last = min(length, first + plan.rows)
        visible = past + last  # the piece's last query sees keys up to here; later keys are masked for all
        query = q[first:last].transpose(0, 1)[None]  # [1, Hq, rows, D]
        rows = torch.arange(first, last, device=q.device)[:, None] + past
        mask = torch.arange(visible, device=q.device)[None, :] <= rows  # bottom-right causal
        result = F.scaled_dot_product_attention(query, key[:, :, :visible], value[:, :, :visible], attn_mask=mask,
                                                enable_gqa=gqa)  # fmt: skip
        pieces.append(result[0].transpose(0, 1))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class ReferenceAttention:
    name = "reference"
    timings_ms: dict[str, float] | None = None  # set when chosen by timing (select_backend)
    selection: str | None = None  # why select_backend chose it

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
            if ctx == length:  # nothing cached before this chunk: its own keys, plain causal (flash takes GQA)
                query = q[start : start + length].transpose(0, 1)[None]  # [1, Hq, q, D]
                key = k[start : start + length].transpose(0, 1)[None]
                value = v[start : start + length].transpose(0, 1)[None]
                result = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
                out[start : start + length] = result[0].transpose(0, 1)
            else:
                slots = meta.context_slots(b)
                plan = prefill_plan(q.device.type, q.shape[1], length, ctx)
                out[start : start + length] = chunk_attention(q[start : start + length], keys[slots], values[slots],
                                                              plan)  # fmt: skip
        return out


class VarlenAttention:
    """FlashAttention-2 varlen over the gathered contexts. K/V heads: where ``varlen_attn`` has ``enable_gqa``
    (torch 2.13) it is set; where it has none (torch 2.11), K/V go in with their own heads all the same
    (``repeat_kv=False``): the kernel underneath, ``aten::_flash_attention_forward``, takes any KV head count
    that divides the query heads, and repeating them 7 times made the gather 7 times larger (64 sequences x 8k
    of context: 7.5 GB per layer). Whether this torch passes them through is not assumed: ``select_backend``
    self-tests that first and falls back to ``repeat_kv=True`` if it raises or differs."""

    name = "varlen"
    timings_ms: dict[str, float] | None = None
    selection: str | None = None

    def __init__(self, repeat_kv: bool = False):
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
        self.repeat_kv = repeat_kv and not self._gqa

    @property
    def kv_heads(self) -> str:
        """How K/V reach the kernel: "enable_gqa", "own heads" or "repeated"."""
        return "enable_gqa" if self._gqa else "repeated" if self.repeat_kv else "own heads"

    def __call__(self, q, k, v, keys, values, meta: AttentionMetadata) -> torch.Tensor:
        slots, cu_q, cu_k, max_q, max_k = meta.varlen_inputs()
        key, value = keys.index_select(0, slots), values.index_select(0, slots)
        return self.packed(q, key, value, cu_q, cu_k, max_q, max_k)

    def packed(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int) -> torch.Tensor:  # fmt: skip
        """Causal varlen attention of packed ``q`` [T, Hq, D] over packed ``key``/``value`` [K, Hk, D]; ``cu_q``/
        ``cu_k`` cumulative lengths (any integer dtype)."""
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        extra = dict(self._causal)
        if key.shape[1] != q.shape[1]:
            if self._gqa:
                extra["enable_gqa"] = True
            elif self.repeat_kv:
                repeat = q.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        return self._fn(q, key, value, cu_q, cu_k, max_q, max_k, **extra)


BACKENDS = ("auto", "reference", "varlen", "triton")
MODEL_SHAPE = (28, 4, 128)  # MiniCPM-V 2.6's LLM: query heads, KV heads, head dim


def select_backend(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int] = MODEL_SHAPE,
                   kv_dtype: torch.dtype | None = None):  # fmt: skip
    """The backend ``name`` asks for (``BACKENDS``) for a model of ``shape`` (query heads, KV heads, head dim)
    and a pool of ``kv_dtype`` (default ``dtype``; FP8: the paged kernel's self-test reads an FP8 pool).

    "auto" on CUDA takes the Triton paged kernel (triton_attention.py) if it builds and agrees with the
    reference on a self-test (mixed decode and prefill, cached prefix, GQA, a split long decode), prompts with
    nothing cached going to it or to varlen, whichever is faster here; if it does not, varlen if it passes the
    same self-test (K/V with their own heads first, repeated if that fails) and is faster than the reference on
    a step of MiniCPM-V's shape; else the reference. Timings are measured here, at start-up: kernels differ by
    version and GPU, so nothing is assumed. "triton" on the CPU runs the kernel under Triton's interpreter (for
    tests: slow). The choice and why are logged (INFO; WARNING where a kernel or a variant failed) and kept on the
    backend (``selection``, ``timings_ms``). Self-tests and timings run on ``device`` (its GPU current)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose {', '.join(BACKENDS)}")
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        backend = ReferenceAttention()
        backend.selection = "asked for" if name == "reference" else f"auto on {device.type}: the reference"
        logger.info("attention: reference (%s)", backend.selection)
        return backend
    with staging.device_scope(device):
        if name == "varlen":
            return _select_varlen_or_fastest(name, device, dtype)
        from minicpmv.engine import triton_attention  # imports triton

        backend, error = triton_attention.validated(device, dtype, shape, kv_dtype)
        if backend is not None:
            return triton_attention.with_fresh_prompts(backend, name, device, dtype, shape, kv_dtype)
        if name == "triton":
            raise RuntimeError(f"attention backend 'triton' is not usable here: {error}")
        logger.warning("attention: the Triton paged kernel is not usable here (%s); trying varlen", error)
        chosen = _select_varlen_or_fastest(name, device, dtype)
        chosen.selection = f"the Triton paged kernel is not usable here ({error}); {chosen.selection}"
        return chosen


def _select_varlen_or_fastest(name: str, device: torch.device, dtype: torch.dtype):
    backend, error = _validated_varlen(device, dtype)
    if backend is None:
        if name == "varlen":
            raise RuntimeError(f"attention backend 'varlen' is not usable here: {error}")
        reference = ReferenceAttention()
        reference.selection = f"varlen is not usable here ({error})"
        logger.warning("attention: reference SDPA path, since varlen is not usable here (%s)", error)
        return reference
    passed = f"varlen (K/V: {backend.kv_heads}) passed the self-test"
    if name == "varlen":
        backend.selection = f"asked for; {passed}"
        logger.info("attention: varlen (%s)", backend.selection)
        return backend
    try:
        chosen = fastest([backend, ReferenceAttention()], lambda b: _time_step(b, device, dtype))
    except Exception as e:  # noqa: BLE001 (timing is an optimisation: keep the validated kernel)
        backend.selection = f"{passed}; timing failed ({type(e).__name__}: {e})"
        logger.warning("attention: varlen (%s)", backend.selection)
        return backend
    chosen.selection = f"{passed}; the faster at a serving step (ms: {chosen.timings_ms})"
    logger.info("attention: %s (%s)", chosen.name, chosen.selection)
    return chosen


def _validated_varlen(device: torch.device, dtype: torch.dtype) -> tuple[VarlenAttention | None, str | None]:
    """The first varlen variant that passes the self-test (K/V with their own heads, then repeated), or None and
    why none did."""
    failures = []
    for repeat in (False, True):
        try:
            backend = VarlenAttention(repeat_kv=repeat)
        except Exception as e:  # noqa: BLE001 (not in this torch: no variant is)
            return None, f"{type(e).__name__}: {e}"
        if repeat and not backend.repeat_kv:
            break  # enable_gqa: nothing to repeat, already tried
        try:
            error = _self_test(backend, device, dtype)
        except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
            error = f"{type(e).__name__}: {e}"
        if error is None:
            return backend, None
        failures.append(f"K/V {backend.kv_heads}: {error}")
        if not repeat and backend.kv_heads == "own heads":
            logger.warning("attention: varlen with K/V in their own heads failed the self-test (%s); trying K/V "
                           "repeated to the query heads", error)  # fmt: skip
    return None, "; ".join(failures)


def fastest(backends: list, time_ms) -> Any:
    """The backend with the smallest ``time_ms(backend)``; every backend gets ``timings_ms`` (all of them)."""
    timings = {b.name: round(time_ms(b), 3) for b in backends}
    for b in backends:
        b.timings_ms = timings
    return min(backends, key=lambda b: timings[b.name])


def _time_step(backend, device: torch.device, dtype: torch.dtype, repeats: int = 5, *,
               query_lens: Sequence[int] = (1,) * 32 + (512,), context_lens: Sequence[int] = (1024,) * 32 + (2048,),
               shape: tuple[int, int, int] = MODEL_SHAPE, kv_dtype: torch.dtype | None = None) -> float:  # fmt: skip
    """Milliseconds of one layer's attention for a serving step, by default 32 decoding sequences with 1,024
    tokens of context and one 512-token prefill chunk after 1,536 cached tokens (28 query heads, 4 KV heads,
    head_dim 128). Events on ``device``'s current stream (the caller makes ``device`` current)."""
    block_size, (heads, kv_heads, dim) = 16, shape
    per_seq = [-(-ctx // block_size) for ctx in context_lens]
    tables, next_block = [], 0
    for blocks in per_seq:
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    keys = torch.randn(next_block * block_size, kv_heads, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    meta = AttentionMetadata.build(list(query_lens), list(context_lens), tables, block_size, device,
                                   tiling=getattr(backend, "tiling", None))  # fmt: skip
    q = torch.randn(sum(query_lens), heads, dim, device=device, dtype=dtype)
    k, v = keys[meta.slot_mapping], values[meta.slot_mapping]
    if kv_dtype is not None and kv_dtype != dtype:
        keys, values = keys.to(kv_dtype), values.to(kv_dtype)
    backend(q, k, v, keys, values, meta)  # warm-up
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(repeats):
        backend(q, k, v, keys, values, meta)
    end.record(stream)
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


# The self-test's bound: |varlen - reference| <= SELF_TEST_ATOL + SELF_TEST_RTOL * |reference|, elementwise.
# bf16 keeps 8 significant bits: neighbours in [2^e, 2^(e+1)) are 2^(e-7) apart, at most 2^-7 |x|, so two ulps
# are at most 2^-6 |x| = 0.0156 |x| < 0.016 |x| at any magnitude (an absolute 2e-2 failed on two ulps above 2,
# where they are 0.031). The absolute floor is for outputs near zero, where a relative bound means nothing: the
# self-test's outputs are averages of N(0, 1) values over 1-40 keys (|x| mostly < 1), two correct bf16 kernels
# differ there by ~1e-3 (rounding of the output and of the probabilities), while a kernel that is wrong (a query
# head reading another group's KV head, a shifted causal mask, wrong sequence bounds) moves them by 0.03 or more.
SELF_TEST_ATOL = 1e-2
SELF_TEST_RTOL = 1.6e-2


def mismatch(got: torch.Tensor, expected: torch.Tensor, atol: float = SELF_TEST_ATOL,
             rtol: float = SELF_TEST_RTOL) -> str | None:  # fmt: skip
    """None if ``got`` agrees with ``expected`` elementwise within ``atol + rtol * |expected|``; else where it
    differs most (relative to the bound)."""
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
    got, expected = got.float(), expected.float()
    if not bool(torch.isfinite(got).all()):
        return "non-finite values"
    diff = (got - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = int((diff - bound).argmax())
    if float(diff.flatten()[worst]) <= float(bound.flatten()[worst]):
        return None
    return (f"differs from the reference by {float(diff.flatten()[worst]):.3g} at a value of "
            f"{float(expected.flatten()[worst]):.3g} (bound {atol:g} + {rtol:g} x |value|)")  # fmt: skip


def _self_test(backend, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int] = MODEL_SHAPE,
               kv_dtype: torch.dtype | None = None) -> str | None:  # fmt: skip
    """None if ``backend`` agrees with the reference (``mismatch``) on a step of a model of ``shape``: a decode
    with 600 tokens of context (long enough for the paged kernel to split it on a GPU), a fresh 5-token prompt,
    a 7-token chunk after 23 cached tokens, a decode at 17, over shuffled blocks; else what differs. With a
    ``kv_dtype`` other than ``dtype`` (FP8) the backend reads a pool of it, the reference its values upcast."""
    generator = torch.Generator().manual_seed(0)
    block_size, (heads, kv_heads, dim) = 16, shape
    pool = [torch.randn(96 * block_size, kv_heads, dim, generator=generator).to(device) for _ in range(2)]
    stored = [x.to(kv_dtype) for x in pool] if kv_dtype is not None and kv_dtype != dtype else None
    keys, values = (x.to(dtype) for x in (stored or pool))
    query_lens, context_lens = [1, 5, 7, 1], [600, 5, 30, 17]
    tables = [list(range(90, 52, -1)), [10], [20, 3], [30, 31]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
    total = sum(query_lens)
    q = torch.randn(total, heads, dim, generator=generator).to(device, dtype)
    k, v = keys[meta.slot_mapping], values[meta.slot_mapping]
    expected = ReferenceAttention()(q, k, v, keys, values, meta)
    tiling = getattr(backend, "tiling", None)
    if tiling is not None:
        meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device, tiling=tiling)
    if stored is not None:
        keys, values = stored
    got = backend(q, k, v, keys, values, meta)
    error = mismatch(got, expected)
    return None if error is None else f"self-test: {error}"
