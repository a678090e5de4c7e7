"""The attention backend that reads the paged KV pool in place (kernels/paged_attention.py).

A step's single-token sequences go to the kernel's decode tiles (split into key ranges at small batch, see
``decode_splits``), its prefill chunks to the prefill tiles; a prompt with nothing cached (``fresh``) goes to
the same kernel or, where FlashAttention varlen is faster (measured at start-up, attention.py), to varlen over
the step's own packed K/V (its keys are its own new tokens: nothing to gather either).

The same backend serves the CUDA-graph decode path (cuda_graphs.py): there the metadata is static
(``StaticPagedMetadata``: block tables in a ``[max batch, max blocks]`` buffer, tiles and query offsets fixed
per batch size), so one graph per batch size covers every context length.
"""

from __future__ import annotations

import torch

from minicpmv.engine.attention import AttentionMetadata, Tiling, VarlenAttention
from minicpmv.engine.cuda_graphs import StaticPagedMetadata
from minicpmv.engine.kernels import paged_attention as kernel

# A decode launch is split until it has about this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 256  # a split reads at least this many keys (fewer: the merge costs more than it gains)


def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, sm_count: int) -> int:
    """Key ranges per decoding sequence: enough programs (sequences x KV heads x splits) to fill ``sm_count``
    multiprocessors ``PROGRAMS_PER_SM`` times over, each range at least ``MIN_KEYS_PER_SPLIT`` keys of
    ``max_context``, at most ``kernel.MAX_SPLITS``. 64 x 4 programs fill an H100 (132 SMs) without a split;
    one sequence with 8k of context takes 32 ranges of 256 keys."""
    programs = num_seqs * num_kv_heads
    wanted = -(-PROGRAMS_PER_SM * sm_count // max(programs, 1))
    useful = max(1, max_context // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, useful, kernel.MAX_SPLITS))


class TritonAttention:
    """``fresh``: where prompts with nothing cached go: "kernel" (the paged kernel) or "varlen" (FlashAttention
    varlen over their own K/V; ``varlen`` is the validated VarlenAttention)."""

    name = "triton"
    timings_ms: dict[str, float] | None = None
    selection: str | None = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 fresh: str = "kernel", varlen: VarlenAttention | None = None):  # fmt: skip
        if fresh not in ("kernel", "varlen") or (fresh == "varlen") != (varlen is not None):
            raise ValueError("fresh='varlen' takes a VarlenAttention; fresh='kernel' none")
        self.num_kv_heads = num_kv_heads
        self.decode_config, self.prefill_config = kernel.tile_configs(num_heads, num_kv_heads, head_dim, dtype)
        self.fresh = fresh
        self._varlen = varlen
        self.tiling = Tiling(self.decode_config.block_q, self.prefill_config.block_q, fresh_elsewhere=fresh != "kernel")
        device = torch.device(device)
        # On the CPU (Triton's interpreter) one program per (sequence, KV head): splitting only costs time there.
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0

    def variant(self, fresh: str, varlen: VarlenAttention | None = None) -> TritonAttention:
        other = object.__new__(TritonAttention)
        other.__dict__.update(self.__dict__)
        other.fresh, other._varlen = fresh, varlen
        other.tiling = Tiling(self.tiling.decode_q, self.tiling.prefill_q, fresh_elsewhere=fresh != "kernel")
        return other

    @property
    def description(self) -> str:
        return f"triton paged kernel (prompts with nothing cached: {self.fresh})"

    def splits(self, num_seqs: int, max_context: int) -> int:
        return decode_splits(num_seqs, self.num_kv_heads, max_context, self.sm_count)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 meta: AttentionMetadata | StaticPagedMetadata) -> torch.Tensor:  # fmt: skip
        """``q`` [T, Hq, D], the step's own ``k``/``v`` [T, Hk, D] (already in the pool), the layer's pool
        ``keys``/``values`` [slots, Hk, D] -> [T, Hq, D]."""
        out = torch.empty_like(q)
        if isinstance(meta, StaticPagedMetadata):
            splits = meta.num_splits
        else:
            splits = self.splits(meta.decode_tiles.shape[0], meta.max_decode_context)
        common = (meta.block_table, meta.seq_lens, meta.cu_q)
        kernel.paged_attention(q, keys, values, out, *common, meta.decode_tiles, meta.block_size,
                               self.decode_config, splits)  # fmt: skip
        if meta.prefill_tiles is not None:
            kernel.paged_attention(q, keys, values, out, *common, meta.prefill_tiles, meta.block_size,
                                   self.prefill_config)  # fmt: skip
        if meta.fresh is not None:
            rows, cu, longest = meta.fresh
            whole = rows.shape[0] == q.shape[0]  # the step is only fresh prompts: no row selection
            pick = (lambda x: x) if whole else (lambda x: x.index_select(0, rows))
            result = self._varlen.packed(pick(q), pick(k), pick(v), cu, cu, longest, longest)
            if whole:
                return result
            out.index_copy_(0, rows, result)
        return out


def validated(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
              kv_dtype: torch.dtype | None = None) -> tuple[TritonAttention | None, str | None]:  # fmt: skip
    """The paged backend for a model of ``shape`` and a pool of ``kv_dtype`` if it builds and passes attention.py's
    self-test (through Triton's interpreter on the CPU), else None and why."""
    from minicpmv.engine import attention

    try:
        backend = TritonAttention(*shape, dtype, device)
        error = attention._self_test(backend, device, dtype, shape, kv_dtype)
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        return None, f"{type(e).__name__}: {e}"
    return (backend, None) if error is None else (None, error)


# The step on which prompts with nothing cached are timed: one 2,048-token prompt, as a document's first chunk.
FRESH_STEP = {"query_lens": (2048,), "context_lens": (2048,)}


def with_fresh_prompts(backend: TritonAttention, name: str, device: torch.device, dtype: torch.dtype,
                       shape: tuple[int, int, int],
                       kv_dtype: torch.dtype | None = None) -> TritonAttention:  # fmt: skip
    """``backend``, or its variant sending prompts with nothing cached to FlashAttention varlen, whichever is
    faster on ``FRESH_STEP`` (CUDA, varlen passing the self-test there too); ``selection`` says why."""
    from minicpmv.engine import attention

    passed = f"{'asked for' if name == 'triton' else 'auto'}; the Triton paged kernel passed the self-test"
    if device.type != "cuda":
        backend.selection = f"{passed} (Triton's interpreter on {device.type})"
        attention.logger.info("attention: %s (%s)", backend.description, backend.selection)
        return backend
    varlen, error = attention._validated_varlen(device, dtype)
    chosen, why = backend, f"varlen is not usable here ({error})"
    if varlen is not None:
        other = backend.variant("varlen", varlen)
        try:
            error = attention._self_test(other, device, dtype, shape, kv_dtype)
            if error is not None:
                why = f"kernel + varlen failed the self-test ({error})"
            else:
                timings = {label: round(attention._time_step(b, device, dtype, shape=shape, kv_dtype=kv_dtype,
                                                             **FRESH_STEP), 3)
                           for label, b in (("kernel", backend), ("varlen", other))}  # fmt: skip
                chosen = other if timings["varlen"] < timings["kernel"] else backend
                chosen.timings_ms = timings
                why = f"the faster on a 2,048-token prompt (ms: {timings})"
        except Exception as e:  # noqa: BLE001 (the kernel alone is validated: keep it)
            chosen, why = backend, f"timing kernel vs varlen failed ({type(e).__name__}: {e})"
    chosen.selection = f"{passed}; prompts with nothing cached: {chosen.fresh}, {why}"
    attention.logger.info("attention: %s (%s)", chosen.description, chosen.selection)
    return chosen
