"""``x @ W^T (+ bias)`` for a bitsandbytes NF4 weight, read in its own storage: fused dequantize-and-matmul.

The weight is what ``bnb.nn.Linear4bit`` holds (``Params4bit`` + ``quant_state``), untouched and uncopied:

* **packed codes**: uint8, two 4-bit NF4 codes per byte, row-major over ``W [N, K]`` (out x in). Weight ``2i`` of
  the flat order is the byte's **high** nibble, ``2i + 1`` its low one (bitsandbytes' ``quantize_4bit`` packs
  ``(q[::2] << 4) | q[1::2]``, its ``dequantize_4bit`` unpacks ``A >> 4`` into even and ``A & 0xF`` into odd
  positions; tests/unit/test_nf4_kernel.py checks both on bytes of known codes).
* **code table**: ``quant_state.code``, 16 float32 values (NF4's).
* **absmax**: one scale per block of ``blocksize`` (64) consecutive weights of the flat order, float32; or, with
  double quantization (``quant_state.nested``), a uint8 code per block into ``state2.code`` (256 float32 values),
  scaled by ``state2.absmax[block // 256]`` (float32, one per 256 blocks) plus ``quant_state.offset``:
  ``absmax[b] = state2.code[q[b]] * state2.absmax[b // 256] + offset``, as ``dequantize_blockwise`` computes it.

A weight is ``code[nibble] * absmax[block]`` in float32, rounded to the activations' dtype (as bitsandbytes'
dequantized matrix is), products accumulated in float32, the output in the activations' dtype. Per weight the
kernels read half a byte; per 64 weights one absmax (float32, or a byte plus a cached table entry and a
per-256-blocks scale when nested). ``K`` must be a multiple of 64, so a block never straddles two rows and an
iteration over 64 columns of one row needs exactly one scale. The nibbles are never interleaved in registers:
a row's 32 bytes of an iteration give its even columns (high nibbles) and odd columns (low nibbles), which meet
the even and odd columns of ``x`` (two strided loads of a small, cached tile).

Two kernels by row count (``matmul``):

* **GEMV** (``_nf4_gemv``, 1-8 rows): grid (column blocks of ``N``, ``num_splits``). A program takes
  ``BLOCK_N`` output columns for all ``BLOCK_M`` (1, 2, 4 or 8: the rows rounded up to a power of two) rows and
  its split's range of ``K``; products are formed on CUDA cores (broadcast multiply, reduced over K), no
  ``tl.dot`` (which needs 16 rows). Split-K: a decode step has a handful of rows, and ``N`` alone (512 for k/v) is
  too few programs for 132 SMs; each split writes a float32 partial sum and ``_nf4_sum_splits`` adds them in
  order (no atomics: deterministic), adds the bias and rounds once. One split writes the output directly.
* **tiled** (``_nf4_tiled``, more rows): grid (row blocks, column blocks), ``tl.dot`` on a dequantized
  ``[BLOCK_N, 32]`` tile per nibble half, fp32 accumulation; bf16/fp16 on tensor cores, float32 exact
  (``input_precision="ieee"``).

No host sync, no data-dependent launch: shapes, grids and split counts follow from ``x.shape`` and the weight's
shape only, so the launches are capturable in CUDA graphs. As with paged_attention.py and lora.py, the source is
jitted twice (``_build``) so CPU tensors run under Triton's interpreter and CUDA tensors the compiled kernels;
the kernels call builtins only (``tl.reduce`` with triton's combine function, not ``tl.sum``), bf16 dots are
upcast to float32 under the interpreter (``DOT_F32``: it has no bf16 ``tl.dot``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from minicpmv.engine.kernels.spec import LaunchSpec

_SUM = tl.standard._sum_combine
BLOCKSIZE = 64  # weights per absmax block: the only blocksize the kernels take (bitsandbytes' default, the int4 repo's)
NESTED_BLOCKSIZE = 256  # absmax blocks per state2 scale (bitsandbytes' double quantization: always 256)
GEMV_MAX_ROWS = 8  # up to this many rows: the GEMV kernel; more: the tiled one
MAX_SPLITS = 16  # the most ranges the GEMV cuts K into
MIN_SPLIT_BLOCKS = 4  # and each at least this many 64-column blocks
PROGRAMS_PER_SM = 2


def _nf4_gemv(x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr, part_ptr,
              M, N, K, num_splits, has_bias, stride_xm, stride_om, stride_ps,
              NESTED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), num_splits). Rows ``< M`` of ``x [M, K]`` (last dimension contiguous) times this
    program's ``BLOCK_N`` rows of ``W``, over its split's range of 64-column blocks. Without ``SPLIT`` the result
    (+ bias) goes to ``out [M, N]`` in its dtype; with it, the float32 partial sum to ``part [splits, M, N]``
    (``stride_ps`` between splits; an empty range writes zeros)."""
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes of one row's block
    n_block = tl.program_id(0)
    split = tl.program_id(1)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    k_blocks = K // BLOCKSIZE
    per_split = (k_blocks + num_splits - 1) // num_splits
    lo = split * per_split
    hi = tl.minimum(lo + per_split, k_blocks)
    j = tl.arange(0, HALF)
    w_rows = w_ptr + n.to(tl.int64) * (K // 2)  # the rows' packed bytes
    block_rows = n.to(tl.int64) * k_blocks  # the rows' first absmax block
    x_rows = x_ptr + rows.to(tl.int64) * stride_xm
    if NESTED:
        offset = tl.load(offset_ptr)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for kb in range(lo, hi):
        packed = tl.load(w_rows[:, None] + (kb * HALF + j)[None, :], mask=n_ok[:, None], other=0)
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32))  # column 2j of the block
        low = tl.load(code_ptr + (packed & 15).to(tl.int32))  # column 2j + 1
        block = block_rows + kb
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=n_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=n_ok, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=n_ok, other=0.0)
        # Rounded to the activations' dtype, as bitsandbytes' dequantized matrix is, then multiplied in float32.
        high = (high * scale[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        low = (low * scale[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        k_even = kb * BLOCKSIZE + 2 * j
        x_even = tl.load(x_rows[:, None] + k_even[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows[:, None] + (k_even + 1)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        product = x_even[:, None, :] * high[None, :, :] + x_odd[:, None, :] * low[None, :, :]
        acc += tl.reduce(product, 2, _SUM)
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT:
        p = part_ptr + split.to(tl.int64) * stride_ps + rows[:, None].to(tl.int64) * N + n[None, :]
        tl.store(p, acc, mask=mask)
    else:
        if has_bias:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o = out_ptr + rows[:, None].to(tl.int64) * stride_om + n[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _nf4_sum_splits(part_ptr, bias_ptr, out_ptr, M, N, num_splits, has_bias, stride_om, stride_ps,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    """Grid (M, cdiv(N, BLOCK_N)): ``out[m, n] = sum_split part[split, m, n] (+ bias[n])``, the splits added in
    order in float32, rounded once to ``out``'s dtype."""
    m = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    row = part_ptr + m.to(tl.int64) * N + n
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for split in range(num_splits):
        acc += tl.load(row + split * stride_ps, mask=n_ok, other=0.0)
    if has_bias:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _nf4_tiled(x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
               M, N, K, has_bias, stride_xm, stride_om,
               NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKSIZE: tl.constexpr,
               NESTED_BLOCKSIZE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): ``out[rows, n] = x[rows] @ W[n]^T (+ bias[n])``, one 64-column
    block of ``K`` per iteration as two dots of 32: even columns (high nibbles) and odd ones (low nibbles)."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k_blocks = K // BLOCKSIZE
    j = tl.arange(0, HALF)
    w_rows = w_ptr + n.to(tl.int64) * (K // 2)
    block_rows = n.to(tl.int64) * k_blocks
    x_rows = x_ptr + rows.to(tl.int64) * stride_xm
    if NESTED:
        offset = tl.load(offset_ptr)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for kb in range(0, k_blocks):
        packed = tl.load(w_rows[:, None] + (kb * HALF + j)[None, :], mask=n_ok[:, None], other=0)
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32))
        low = tl.load(code_ptr + (packed & 15).to(tl.int32))
        block = block_rows + kb
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=n_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=n_ok, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=n_ok, other=0.0)
        high = (high * scale[:, None]).to(x_ptr.dtype.element_ty)
        low = (low * scale[:, None]).to(x_ptr.dtype.element_ty)
        k_even = kb * BLOCKSIZE + 2 * j
        x_even = tl.load(x_rows[:, None] + k_even[None, :], mask=row_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows[:, None] + (k_even + 1)[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_F32:
            high = high.to(tl.float32)
            low = low.to(tl.float32)
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
        if IEEE:
            acc += tl.dot(x_even, tl.trans(high), input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(low), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(high))
            acc += tl.dot(x_odd, tl.trans(low))
    if has_bias:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o = out_ptr + rows[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@functools.cache
def _build(interpret: bool):
    """(gemv, sum_splits, tiled), jitted for the GPU or for Triton's interpreter (CPU tensors), side by side. The
    row count, the split count and the bias flag are not specialised (Triton would compile a variant for a value of
    1): one compiled variant per (dtype, storage, tile shape), the ones ``launch_configs`` lists."""
    with knobs.runtime.scope():
        knobs.runtime.interpret = interpret
        return (triton.jit(_nf4_gemv, do_not_specialize=["M", "num_splits", "has_bias"]),
                triton.jit(_nf4_sum_splits, do_not_specialize=["M", "num_splits", "has_bias"]),
                triton.jit(_nf4_tiled, do_not_specialize=["M", "has_bias"]))  # fmt: skip


def kernels(interpret: bool = False):
    """The jitted (gemv, sum_splits, tiled) (the GPU variant by default; what the AOT compilation takes)."""
    return _build(interpret)


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TiledConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


SUM_BLOCK_N = 256  # output columns per program of the split sum


def gemv_config(rows: int, dtype: torch.dtype) -> GemvConfig:
    """The GEMV tile for 1-8 rows: ``block_m`` the rows rounded up to a power of two; ``block_n`` output columns
    so that a program's product tile (``block_m x block_n x 32``) stays at 4,096 values (1 row: 128 columns, 8
    rows: 16), 4 warps: 32 float32 values of it per thread, no spills on sm_90/sm_80 (test_kernel_aot.py)."""
    if not 1 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV kernel takes 1..{GEMV_MAX_ROWS} rows, got {rows}")
    block_m = triton.next_power_of_2(rows)
    return GemvConfig(block_m=block_m, block_n=128 // block_m, num_warps=4, num_stages=2)


def tiled_config(rows: int, dtype: torch.dtype) -> TiledConfig:
    """The tiled kernel's tile: 16 rows up to 16 (a decode batch of 9-16), else 64; 128 output columns, 3 stages
    (4 warps at 16 rows, 8 at 64). Float32 (exact dots: no tensor cores) takes 64 columns and no pipelining: with
    2-3 stages ptxas spills at any tile tried on sm_90/sm_80 (test_kernel_aot.py)."""
    block_m = 16 if rows <= 16 else 64
    warps = 4 if block_m == 16 else 8
    if dtype == torch.float32:
        return TiledConfig(block_m=block_m, block_n=64, num_warps=warps, num_stages=1)
    return TiledConfig(block_m=block_m, block_n=128, num_warps=warps, num_stages=3)


def gemv_splits(out_features: int, in_features: int, block_n: int, sm_count: int) -> int:
    """Ranges of ``K`` per GEMV launch: enough programs (column blocks x splits) to fill ``sm_count``
    multiprocessors ``PROGRAMS_PER_SM`` times, each range at least ``MIN_SPLIT_BLOCKS`` 64-column blocks, at most
    ``MAX_SPLITS`` (1 on the CPU: ``sm_count`` 0). Shapes only: the same for every call of a layer and row count."""
    programs = -(-out_features // block_n)
    wanted = -(-PROGRAMS_PER_SM * sm_count // max(programs, 1))
    useful = max(1, (in_features // BLOCKSIZE) // MIN_SPLIT_BLOCKS)
    return max(1, min(wanted, useful, MAX_SPLITS))


class NF4Weight:
    """One NF4 weight's device tensors, prepared once (a layer's, at start-up) for every later launch: views of the
    ``Linear4bit``'s own tensors (nothing copied but the 16-entry code table and, where not already float32 on the
    device, the small nested tables). ``packed`` [N, K / 2] uint8; ``absmax`` [N * K / 64] float32, or uint8 with
    ``nested`` (then ``code2`` [256] float32, ``absmax2`` float32 [ceil(blocks / 256)] and ``offset`` [1] float32,
    read on the device: no host sync)."""

    def __init__(self, weight: torch.Tensor, quant_state) -> None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("the weight was repacked for bitsandbytes' CPU kernel (its first CPU forward): not "
                             "bitsandbytes' storage any more")  # fmt: skip
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_type {quant_state.quant_type!r}: the kernel reads nf4 only")
        if quant_state.blocksize != BLOCKSIZE:
            raise ValueError(f"blocksize {quant_state.blocksize}: the kernel reads blocks of {BLOCKSIZE} only")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape {shape}: a 2-D [out, in] weight expected")
        out_features, in_features = shape
        if in_features % BLOCKSIZE:
            raise ValueError(f"in_features {in_features} is not a multiple of {BLOCKSIZE}")
        data = weight.detach().as_subclass(torch.Tensor)  # a Params4bit: its plain tensor (same memory)
        if data.dtype != torch.uint8:
            data = data.view(torch.uint8)  # another quant_storage: the same bytes
        if data.numel() != out_features * in_features // 2 or not data.is_contiguous():
            raise ValueError(f"packed weight of {data.numel()} bytes ({'' if data.is_contiguous() else 'not '}"
                             f"contiguous) does not hold {shape} NF4 codes")  # fmt: skip
        device = data.device
        self.out_features, self.in_features = out_features, in_features
        self.device = device
        self.packed = data.reshape(out_features, in_features // 2)
        blocks = out_features * in_features // BLOCKSIZE
        self.code = quant_state.code.to(device=device, dtype=torch.float32).contiguous()
        if self.code.numel() != 16:
            raise ValueError(f"an NF4 code table has 16 entries, got {self.code.numel()}")
        self.nested = bool(quant_state.nested)
        absmax = quant_state.absmax.reshape(-1)
        if absmax.numel() != blocks:
            raise ValueError(f"absmax has {absmax.numel()} entries for {blocks} blocks")
        if self.nested:
            state2 = quant_state.state2
            if state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize {state2.blocksize}: the kernel reads {NESTED_BLOCKSIZE} only")
            if absmax.dtype != torch.uint8:
                raise ValueError(f"nested absmax must be uint8 codes, got {absmax.dtype}")
            self.absmax = absmax.to(device).contiguous()
            self.code2 = state2.code.to(device=device, dtype=torch.float32).contiguous()
            self.absmax2 = state2.absmax.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
            if self.code2.numel() != 256 or self.absmax2.numel() < -(-blocks // NESTED_BLOCKSIZE):
                raise ValueError(f"nested state: {self.code2.numel()} codes (256 expected), {self.absmax2.numel()} "
                                 f"scales for {blocks} blocks")  # fmt: skip
            offset = quant_state.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset))
            self.offset = offset.reshape(1).to(device=device, dtype=torch.float32)
        else:
            self.absmax = absmax.to(device=device, dtype=torch.float32).contiguous()
            # Unread without NESTED: any float32 tensor on the device stands in (pointers must be valid).
            self.code2 = self.absmax2 = self.offset = self.code
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0

    @classmethod
    def from_module(cls, module) -> NF4Weight:
        """From a ``bnb.nn.Linear4bit`` (its ``weight`` and ``weight.quant_state``)."""
        return cls(module.weight, module.weight.quant_state)

    def rows(self, start: int, stop: int) -> NF4Weight:
        """The weight of output rows ``start:stop`` (views, nothing copied): a shard, or one tile of a large
        matrix for a test. Nested storage needs ``start``'s first block on a 256-block boundary."""
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows {start}:{stop} out of 0:{self.out_features}")
        per_row = self.in_features // BLOCKSIZE
        first, last = start * per_row, stop * per_row
        if self.nested and first % NESTED_BLOCKSIZE:
            raise ValueError(f"rows from {start}: block {first} is not on a {NESTED_BLOCKSIZE}-block boundary")
        other = object.__new__(NF4Weight)
        other.__dict__.update(self.__dict__)
        other.out_features = stop - start
        other.packed = self.packed[start:stop]
        other.absmax = self.absmax[first:last]
        if self.nested:
            other.absmax2 = self.absmax2[first // NESTED_BLOCKSIZE :]
        return other

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, num_splits: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in ``x``'s dtype (bf16, fp16 or float32). Up to 8 rows:
        the GEMV kernel with ``num_splits`` ranges of K (default ``gemv_splits``: 1 on the CPU); more: the tiled
        kernel. CPU tensors run under Triton's interpreter."""
        if x.dtype not in _TRITON_TYPE:
            raise ValueError(f"activations of {x.dtype}: bf16, fp16 or float32 expected")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight {self.in_features}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device}, the weight on {self.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        if out is None:
            out = torch.empty((rows, self.out_features), dtype=x.dtype, device=x.device)
        elif out.shape != (rows, self.out_features) or out.dtype != x.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be [{rows}, {self.out_features}] {x.dtype} with contiguous rows")
        if rows == 0:
            return out.reshape(*lead, self.out_features)
        has_bias = bias is not None
        if has_bias:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias of shape {tuple(bias.shape)}, ({self.out_features},) expected")
            bias = bias.to(x.dtype).contiguous()  # no copy where it already is
        else:
            bias = out  # unread
        interpret = x.device.type != "cuda"
        gemv, sum_splits, tiled = _build(interpret)
        n, k = self.out_features, self.in_features
        weight_args = (self.packed, self.absmax, self.code, self.code2, self.absmax2, self.offset)
        if rows <= GEMV_MAX_ROWS:
            config = gemv_config(rows, x.dtype)
            splits = num_splits or gemv_splits(n, k, config.block_n, self.sm_count)
            if not 1 <= splits <= MAX_SPLITS:
                raise ValueError(f"num_splits must be 1..{MAX_SPLITS}, got {splits}")
            split = splits > 1
            part = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device) if split else out
            gemv[(triton.cdiv(n, config.block_n), splits)](
                x2, *weight_args, bias, out, part, rows, n, k, splits, int(has_bias), x2.stride(0), out.stride(0),
                part.stride(0) if split else 0, NESTED=self.nested, SPLIT=split, BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, BLOCKSIZE=BLOCKSIZE, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
            if split:
                sum_splits[(rows, triton.cdiv(n, SUM_BLOCK_N))](
                    part, bias, out, rows, n, splits, int(has_bias), out.stride(0), part.stride(0),
                    BLOCK_N=SUM_BLOCK_N, num_warps=4,
                )  # fmt: skip
        else:
            config = tiled_config(rows, x.dtype)
            tiled[(triton.cdiv(rows, config.block_m), triton.cdiv(n, config.block_n))](
                x2, *weight_args, bias, out, rows, n, k, int(has_bias), x2.stride(0), out.stride(0),
                NESTED=self.nested, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCKSIZE=BLOCKSIZE,
                NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOT_F32=interpret and x.dtype == torch.bfloat16,
                IEEE=x.dtype == torch.float32, num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
        return out.reshape(*lead, self.out_features)


def nf4_matmul(x: torch.Tensor, weight_packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
               num_splits: int | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W^T (+ bias)`` for the NF4 weight ``weight_packed`` (a ``Linear4bit``'s ``weight``) with its
    ``quant_state``. Builds the ``NF4Weight`` each call (cheap, no sync); a layer called repeatedly should keep
    one (``NF4Weight.from_module``) and call its ``matmul``."""
    return NF4Weight(weight_packed, quant_state).matmul(x, bias, num_splits)


# ---------------------------------------------------------------- what the engine can launch (AOT)

# (out, in) of the LLM's 4-bit linears: MiniCPM-V 2.6 (q/o 3584x3584, k/v 512x3584, gate/up 18944x3584, down
# 3584x18944) and the tiny checkpoint. Runtime ints (multiples of 64): one compiled variant serves them all.
MODEL_LINEARS = {
    "minicpmv-2.6": ((3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)),
    "tiny": ((256, 256), (128, 256), (512, 256), (256, 512)),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def launch_configs() -> list[LaunchSpec]:
    """Per activation dtype and absmax storage (float32, or uint8 codes when nested): the GEMV kernel for each
    row block (1, 2, 4, 8), with and without split (what varies its code), the tiled kernel for each row block
    (16, 64), and per dtype the split sum. Row counts, N, K, the split count and the bias flag are runtime values."""
    gemv, sum_splits, tiled = kernels()
    specs = []
    for dtype in DTYPES:
        t = _TRITON_TYPE[dtype]
        for nested in (True, False):
            storage = "nested" if nested else "fp32-absmax"
            weights = {"w_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                       "code2_ptr": "*fp32", "absmax2_ptr": "*fp32", "offset_ptr": "*fp32"}  # fmt: skip
            common = {"x_ptr": f"*{t}", **weights, "bias_ptr": f"*{t}", "out_ptr": f"*{t}", "M": "i32", "N": "i32",
                      "K": "i32", "has_bias": "i32", "stride_xm": "i32", "stride_om": "i32"}  # fmt: skip
            aligned = ("x_ptr", "w_ptr", "absmax_ptr", "code_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_xm",
                       "stride_om")  # fmt: skip
            for rows in (1, 2, 4, 8):
                config = gemv_config(rows, dtype)
                for split in (False, True):
                    specs.append(LaunchSpec(
                        f"nf4-gemv m{config.block_m}{' split' if split else ''} {storage} {t}", gemv,
                        {**common, "part_ptr": "*fp32", "num_splits": "i32", "stride_ps": "i32"},
                        {"NESTED": nested, "SPLIT": split, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                         "BLOCKSIZE": BLOCKSIZE, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE},
                        config.num_warps, config.num_stages, (*aligned, "part_ptr")))  # fmt: skip
            for rows in (16, 64):
                config = tiled_config(rows, dtype)
                specs.append(LaunchSpec(
                    f"nf4-tiled m{config.block_m} {storage} {t}", tiled, common,
                    {"NESTED": nested, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCKSIZE": BLOCKSIZE,
                     "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE, "DOT_F32": False, "IEEE": dtype == torch.float32},
                    config.num_warps, config.num_stages, aligned))  # fmt: skip
        sum_signature = {"part_ptr": "*fp32", "bias_ptr": f"*{t}", "out_ptr": f"*{t}", "M": "i32", "N": "i32",
                         "num_splits": "i32", "has_bias": "i32", "stride_om": "i32", "stride_ps": "i32"}  # fmt: skip
        specs.append(LaunchSpec(f"nf4-sum-splits {t}", sum_splits, sum_signature, {"BLOCK_N": SUM_BLOCK_N}, 4, 1,
                                ("part_ptr", "bias_ptr", "out_ptr", "N", "stride_om", "stride_ps")))  # fmt: skip
    return specs
