"""The LoRA term of a packed step for several adapters at once (punica's SGMV): two Triton kernels over segments.

Each row ``t`` of a step's ``x [T, in]`` uses one adapter slot ``slot[t]`` (or ``-1``: none). A target linear
layer's adapters are stacked on the device, ``A [S, R, in]`` and ``B [S, out, R]`` (``R`` = max_lora_rank, lower
ranks padded with zeros, B already scaled), and the term added to the base layer's output is
``delta[t] = B[slot[t]] @ (A[slot[t]] @ x[t])`` (nothing for slot -1). Any strides with a contiguous last
dimension are read: the engine's concatenated stacks (``A [S * R, in]``, ``B [out, S * R]``) are the views
``A.view(S, R, in)`` and ``B.view(out, S, R).transpose(0, 1)``.

Rows are taken in **tiles**: at most ``BLOCK_M`` (16) consecutive rows of one slot, cut from the runs of equal
slots by ``segment_tiles`` (a sequence's rows are contiguous in a step; neighbouring sequences of one adapter share
a run), rows of slot -1 in none. The host gives them as a table ``[N, 3]`` int32 (first row, rows, slot); a tile
of 0 rows is padding and does nothing, so a CUDA graph captured for N tiles serves any step that needs <= N.

* **shrink** (``_lora_shrink``): grid (tiles, rank blocks, splits); ``h[split, t, :] = A[slot] @ x[t]`` over its
  split's range of ``in`` (float32). Split-K: a decode step has a few tiles but ``in`` is 3,584 or 18,944
  columns; ``num_splits`` ranges run in parallel and write partial sums, no atomics (deterministic).
* **expand** (``_lora_expand``): grid (tiles, column blocks of ``out``); ``out[t, :] += B[slot] @ sum_split
  h[split, t, :]`` in place, accumulated in float32 and rounded once into ``out``'s dtype. ``h`` is rounded to
  the weights' dtype for the dot (as PEFT's bf16 ``lora_B(lora_A(x))`` is), in float32 it stays exact.

Everything about rows is read from device memory (the tile table): no host sync, fixed shapes for fixed N.
As with paged_attention.py, the source is jitted twice (``_build``) so CPU tensors run under Triton's
interpreter and CUDA tensors the compiled kernels; the kernels call builtins only, bf16 dots are upcast to
float32 under the interpreter (``DOT_F32``, it has no bf16 ``tl.dot``), float32 dots are exact
(``IEEE``: no TF32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs

from minicpmv.engine.kernels.spec import LaunchSpec

BLOCK_M = 16  # rows per tile: the least tl.dot takes (decode tiles are mostly 1 row, masked)
MAX_SPLITS = 16  # the most ranges the shrink cuts ``in`` into
MIN_SPLIT_COLUMNS = 256  # and each at least this many columns of ``in`` (two BLOCK_K iterations)
PROGRAMS_PER_SM = 2


def _lora_shrink(x_ptr, a_ptr, h_ptr, tiles_ptr, in_features, rank, num_splits, stride_xt, stride_as, stride_ar,
                 stride_hs, stride_ht, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_F32: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Grid (tiles, cdiv(rank, BLOCK_R), num_splits). ``tiles_ptr`` [N, 3] int32 (first row, rows, slot);
    ``h_ptr`` [num_splits, T, >= rank] float32: the tile's rows of this split's partial ``A[slot] @ x[t]``
    (an empty range writes zeros, so the splits always sum to the whole)."""
    tile = tl.program_id(0)
    r_block = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(tiles_ptr + 3 * tile)
    n_rows = tl.load(tiles_ptr + 3 * tile + 1)
    slot = tl.load(tiles_ptr + 3 * tile + 2)
    if n_rows > 0:
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        t = (first + rows).to(tl.int64)
        r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        k_blocks = (in_features + BLOCK_K - 1) // BLOCK_K
        per_split = (k_blocks + num_splits - 1) // num_splits
        lo = split * per_split
        hi = tl.minimum(lo + per_split, k_blocks)
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + r.to(tl.int64) * stride_ar
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
        for k_block in range(lo, hi):
            k = k_block * BLOCK_K + offs_k
            k_ok = k < in_features
            x = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_rows[:, None] + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            if IEEE:
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(a))
        h = h_ptr + split.to(tl.int64) * stride_hs + t[:, None] * stride_ht + r[None, :]
        tl.store(h, acc, mask=row_ok[:, None] & r_ok[None, :])


def _lora_expand(h_ptr, b_ptr, out_ptr, tiles_ptr, out_features, rank, num_splits, stride_hs, stride_ht, stride_bs,
                 stride_bo, stride_ot, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_F32: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Grid (tiles, cdiv(out_features, BLOCK_N)). ``out[t, n] += sum_r B[slot, n, r] * sum_split h[split, t, r]``
    for the tile's rows and this block of columns; other rows of ``out`` are not touched."""
    tile = tl.program_id(0)
    n_block = tl.program_id(1)
    first = tl.load(tiles_ptr + 3 * tile)
    n_rows = tl.load(tiles_ptr + 3 * tile + 1)
    slot = tl.load(tiles_ptr + 3 * tile + 2)
    if n_rows > 0:
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        t = (first + rows).to(tl.int64)
        n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < out_features
        b_rows = b_ptr + slot.to(tl.int64) * stride_bs + n.to(tl.int64) * stride_bo
        h_rows = h_ptr + t * stride_ht
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for r_start in range(0, rank, BLOCK_R):
            r = r_start + offs_r
            r_ok = r < rank
            h_mask = row_ok[:, None] & r_ok[None, :]
            h = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
            for split in range(num_splits):
                h += tl.load(h_rows[:, None] + split * stride_hs + r[None, :], mask=h_mask, other=0.0)
            h = h.to(b_ptr.dtype.element_ty)  # the dot's operand type (PEFT's rounding of lora_A's output)
            b = tl.load(b_rows[:, None] + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if DOT_F32:
                h = h.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc += tl.dot(h, tl.trans(b), input_precision="ieee")
            else:
                acc += tl.dot(h, tl.trans(b))
        o_ptrs = out_ptr + t[:, None] * stride_ot + n[None, :]
        o_mask = row_ok[:, None] & n_ok[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32) + acc
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)


@functools.cache
def _build(interpret: bool):
    """(shrink, expand), jitted for the GPU or for Triton's interpreter (CPU tensors), side by side. The rank and
    the split count are not specialised (a rank-1 server or a 1-split step compiles no variant of its own)."""
    with knobs.runtime.scope():
        knobs.runtime.interpret = interpret
        return (triton.jit(_lora_shrink, do_not_specialize=["rank", "num_splits"]),
                triton.jit(_lora_expand, do_not_specialize=["rank", "num_splits"]))  # fmt: skip


def kernels(interpret: bool = False):
    """The jitted (shrink, expand) (the GPU variant by default; what the AOT compilation takes)."""
    return _build(interpret)


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Tile shapes and launch options: ``block_r`` rank columns per shrink program / per expand iteration,
    ``block_k`` columns of ``in`` per shrink iteration, ``block_n`` output columns per expand program."""

    block_r: int
    block_k: int
    block_n: int
    shrink_warps: int
    shrink_stages: int
    expand_warps: int
    expand_stages: int


def kernel_config(dtype: torch.dtype, rank: int) -> LoRAKernelConfig:
    """The tile shapes for a dtype and a max_lora_rank (any, 1..512: larger ranks loop over ``block_r`` blocks).
    ``block_r``: 16 for ranks up to 16, else 64 (a rank of 32 leaves half a block masked: no memory read).
    bf16/fp16: 128 columns of ``in`` per shrink iteration, 3 stages, 4 warps; 128 output columns per expand
    program, 8 warps with 64-rank blocks (4 hold its B tile in ~150 registers on sm_80). float32 (exact dots, no
    tensor cores): 64 and 64. All within 100 registers, no spills (test_kernel_aot.py, sm_90/sm_80)."""
    block_r = 16 if rank <= 16 else 64
    expand_warps = 8 if block_r == 64 else 4
    if dtype == torch.float32:
        return LoRAKernelConfig(block_r, block_k=64, block_n=64, shrink_warps=4, shrink_stages=2,
                                expand_warps=expand_warps, expand_stages=1)  # fmt: skip
    return LoRAKernelConfig(block_r, block_k=128, block_n=128, shrink_warps=4, shrink_stages=3,
                            expand_warps=expand_warps, expand_stages=1)  # fmt: skip


def shrink_splits(num_tiles: int, in_features: int, sm_count: int) -> int:
    """Ranges of ``in`` per tile for the shrink: enough programs to fill ``sm_count`` multiprocessors
    ``PROGRAMS_PER_SM`` times, each range at least ``MIN_SPLIT_COLUMNS``, at most ``MAX_SPLITS`` (1 on the CPU:
    ``sm_count`` 0). A CUDA graph captures one value: pass the same for every replay of it."""
    wanted = -(-PROGRAMS_PER_SM * sm_count // max(num_tiles, 1))
    useful = max(1, in_features // MIN_SPLIT_COLUMNS)
    return max(1, min(wanted, useful, MAX_SPLITS))


def segment_tiles(row_slots, block_m: int = BLOCK_M, pad_to: int | None = None) -> np.ndarray:
    """``[N, 3]`` int32 (first row, rows, slot): the runs of equal slots in ``row_slots`` (list or array of
    ints, -1 = no adapter, skipped) cut into tiles of at most ``block_m`` rows, in row order. ``pad_to``: append
    0-row tiles (no-ops) up to that many (a CUDA graph's fixed count; at most ``len(row_slots)`` are needed);
    raises ValueError when more are needed."""
    slots = np.asarray(row_slots, dtype=np.int64).reshape(-1)
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    if slots.size and slots.min() < -1:
        raise ValueError(f"row slots must be >= -1, got {int(slots.min())}")
    starts = np.flatnonzero(np.concatenate([[slots.size > 0], slots[1:] != slots[:-1]]))
    ends = np.append(starts[1:], slots.size)[: starts.size]
    keep = slots[starts] >= 0
    starts, ends = starts[keep], ends[keep]
    counts = (ends - starts + block_m - 1) // block_m
    run = np.repeat(np.arange(starts.size), counts)
    within = np.arange(run.size) - np.repeat(np.cumsum(counts) - counts, counts)
    first = starts[run] + within * block_m
    tiles = np.stack([first, np.minimum(block_m, ends[run] - first), slots[starts][run]], axis=1)
    if pad_to is not None:
        if tiles.shape[0] > pad_to:
            raise ValueError(f"{tiles.shape[0]} tiles do not fit in pad_to={pad_to}")
        tiles = np.concatenate([tiles, np.zeros((pad_to - tiles.shape[0], 3), dtype=tiles.dtype)])
    return tiles.astype(np.int32).reshape(-1, 3)


def _check_tiles(tiles: torch.Tensor, device: torch.device) -> None:
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 3 or not tiles.is_contiguous():
        raise ValueError(f"tiles must be a contiguous [N, 3] int32 tensor, got {tiles.dtype} {tuple(tiles.shape)}")
    if tiles.device != device:
        raise ValueError(f"tiles are on {tiles.device}, the tensors on {device}")


def lora_shrink(x: torch.Tensor, A: torch.Tensor, tiles: torch.Tensor, num_splits: int = 1,
                h: torch.Tensor | None = None, config: LoRAKernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``h [num_splits, T, R]`` float32 whose sum over splits is ``A[slot] @ x[t]`` for the rows in ``tiles``
    (other rows of ``h`` are left as they were: unused). ``x [T, in]``, ``A [S, R, in]`` (x's dtype, last
    dimension contiguous); ``tiles`` [N, 3] int32 from ``segment_tiles`` on x's device; ``h``: a preallocated
    buffer of that shape (a CUDA graph's), else a new one. CPU tensors run under Triton's interpreter."""
    total, in_features = x.shape
    slots, rank, a_in = A.shape
    if a_in != in_features or A.dtype != x.dtype or x.stride(1) != 1 or A.stride(2) != 1:
        raise ValueError(f"A {tuple(A.shape)} {A.dtype} does not match x {tuple(x.shape)} {x.dtype}, or a last "
                         "dimension is not contiguous")  # fmt: skip
    _check_tiles(tiles, x.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be 1..{MAX_SPLITS}, got {num_splits}")
    if h is None:
        h = torch.empty((num_splits, total, rank), dtype=torch.float32, device=x.device)
    elif h.dtype != torch.float32 or tuple(h.shape) != (num_splits, total, rank) or h.stride(2) != 1:
        raise ValueError(f"h must be float32 [{num_splits}, {total}, {rank}], got {h.dtype} {tuple(h.shape)}")
    if tiles.shape[0] == 0:
        return h
    interpret = x.device.type != "cuda"
    config = config or kernel_config(x.dtype, rank)
    shrink, _ = _build(interpret)
    grid = (tiles.shape[0], triton.cdiv(rank, config.block_r), num_splits)
    shrink[grid](
        x, A, h, tiles, in_features, rank, num_splits, x.stride(0), A.stride(0), A.stride(1), h.stride(0),
        h.stride(1), BLOCK_M=BLOCK_M, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        DOT_F32=interpret and x.dtype == torch.bfloat16, IEEE=x.dtype == torch.float32,
        num_warps=config.shrink_warps, num_stages=config.shrink_stages,
    )  # fmt: skip
    return h


def lora_expand(h: torch.Tensor, B: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor,
                config: LoRAKernelConfig | None = None) -> None:  # fmt: skip
    """``out[t] += B[slot] @ h.sum(0)[t]`` in place for the rows in ``tiles`` (the same table as the shrink's);
    ``h`` float32 [splits, T, R] (``lora_shrink``'s); ``B [S, out, R]`` and ``out [T, out]`` of one dtype, last
    dimensions contiguous (``out`` may be a column slice of a wider output)."""
    num_splits, total, rank = h.shape
    slots, out_features, b_rank = B.shape
    if (b_rank != rank or out.shape != (total, out_features) or out.dtype != B.dtype or B.stride(2) != 1
            or out.stride(1) != 1 or h.stride(2) != 1 or h.dtype != torch.float32):  # fmt: skip
        raise ValueError(f"B {tuple(B.shape)} {B.dtype}, out {tuple(out.shape)} {out.dtype} and h {tuple(h.shape)} "
                         f"{h.dtype} do not match (or a last dimension is not contiguous)")  # fmt: skip
    _check_tiles(tiles, out.device)
    if tiles.shape[0] == 0:
        return
    interpret = out.device.type != "cuda"
    config = config or kernel_config(out.dtype, rank)
    _, expand = _build(interpret)
    grid = (tiles.shape[0], triton.cdiv(out_features, config.block_n))
    expand[grid](
        h, B, out, tiles, out_features, rank, num_splits, h.stride(0), h.stride(1), B.stride(0), B.stride(1),
        out.stride(0), BLOCK_M=BLOCK_M, BLOCK_R=config.block_r, BLOCK_N=config.block_n,
        DOT_F32=interpret and out.dtype == torch.bfloat16, IEEE=out.dtype == torch.float32,
        num_warps=config.expand_warps, num_stages=config.expand_stages,
    )  # fmt: skip


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor,
               num_splits: int = 1, h: torch.Tensor | None = None) -> None:  # fmt: skip
    """``out[t] += B[slot[t]] @ (A[slot[t]] @ x[t])`` for the rows of ``tiles`` (rows of slot -1 have no tile and
    keep their values): ``lora_shrink`` then ``lora_expand``. An empty table launches nothing; arguments that do
    not fit together are refused before anything is launched."""
    if B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1] or out.shape != (x.shape[0], B.shape[1]) or (
            B.dtype != x.dtype or out.dtype != x.dtype):  # fmt: skip
        raise ValueError(f"B {tuple(B.shape)} {B.dtype} and out {tuple(out.shape)} {out.dtype} do not match x "
                         f"{tuple(x.shape)} {x.dtype} and A {tuple(A.shape)}")  # fmt: skip
    if tiles.shape[0] == 0:
        return
    lora_expand(lora_shrink(x, A, tiles, num_splits, h), B, out, tiles)


def lora_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, row_slots) -> torch.Tensor:
    """``delta [T, out]`` in float32 (float64 for float64 inputs), one slot at a time in plain torch: what the
    kernels add to ``out`` (``out += delta`` rounds once, as they do). Zero rows for slot -1. ``row_slots``: a
    list, array or tensor of T ints."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    slots = torch.as_tensor(row_slots, dtype=torch.int64, device=x.device)
    delta = torch.zeros((x.shape[0], B.shape[1]), dtype=dtype, device=x.device)
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(slots == slot).squeeze(1)
        delta[rows] = (x[rows].to(dtype) @ A[slot].to(dtype).T) @ B[slot].to(dtype).T
    return delta


# ---------------------------------------------------------------- what the engine can launch (AOT)

# (in, out) of the LLM linear layers LoRA may target: q, k/v, o, gate/up, down. MiniCPM-V 2.6 (Qwen2-7B, hidden
# 3,584, 28:4 heads of 128, MLP 18,944) and the tiny checkpoint (hidden 256, 4:2 heads of 64, MLP 512). They are
# runtime ints (multiples of 16, as their strides): one compiled variant serves them all.
MODEL_LINEARS = {
    "minicpmv-2.6": ((3584, 3584), (3584, 512), (3584, 3584), (3584, 18944), (18944, 3584)),
    "tiny": ((256, 256), (256, 128), (256, 256), (256, 512), (512, 256)),
}
RANKS = (16, 64)  # max_lora_rank <= 16 takes block_r 16; any larger one (default 64) block_r 64
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def launch_configs() -> list[LaunchSpec]:
    """Shrink and expand per dtype and rank block (``kernel_config``): what varies the compiled code. Row counts,
    ``in``/``out``, the rank itself and the split count are runtime values."""
    shrink, expand = kernels()
    specs = []
    for dtype in DTYPES:
        t = _TRITON_TYPE[dtype]
        for rank in RANKS:
            config = kernel_config(dtype, rank)
            common = {"BLOCK_M": BLOCK_M, "BLOCK_R": config.block_r, "DOT_F32": False, "IEEE": dtype == torch.float32}
            shrink_signature = {
                "x_ptr": f"*{t}", "a_ptr": f"*{t}", "h_ptr": "*fp32", "tiles_ptr": "*i32", "in_features": "i32",
                "rank": "i32", "num_splits": "i32", "stride_xt": "i32", "stride_as": "i32", "stride_ar": "i32",
                "stride_hs": "i32", "stride_ht": "i32",
            }  # fmt: skip
            shrink_aligned = ("x_ptr", "a_ptr", "h_ptr", "tiles_ptr", "in_features", "stride_xt", "stride_as",
                              "stride_ar", "stride_hs", "stride_ht")  # fmt: skip
            specs.append(LaunchSpec(f"lora-shrink r{config.block_r} {t}", shrink, shrink_signature,
                                    {**common, "BLOCK_K": config.block_k}, config.shrink_warps,
                                    config.shrink_stages, shrink_aligned))  # fmt: skip
            expand_signature = {
                "h_ptr": "*fp32", "b_ptr": f"*{t}", "out_ptr": f"*{t}", "tiles_ptr": "*i32", "out_features": "i32",
                "rank": "i32", "num_splits": "i32", "stride_hs": "i32", "stride_ht": "i32", "stride_bs": "i32",
                "stride_bo": "i32", "stride_ot": "i32",
            }  # fmt: skip
            expand_aligned = ("h_ptr", "b_ptr", "out_ptr", "tiles_ptr", "out_features", "stride_hs", "stride_ht",
                              "stride_bs", "stride_bo", "stride_ot")  # fmt: skip
            specs.append(LaunchSpec(f"lora-expand r{config.block_r} {t}", expand, expand_signature,
                                    {**common, "BLOCK_N": config.block_n}, config.expand_warps,
                                    config.expand_stages, expand_aligned))  # fmt: skip
    return specs
