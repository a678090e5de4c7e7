"""Attention that reads the paged KV pool in place: one Triton kernel for decode rows and prefill chunks.

A packed step (attention.py) is cut into **tiles**: ``BLOCK_Q`` consecutive new tokens of one sequence. A
program takes one tile and one KV head, and its ``BLOCK_M = BLOCK_Q x GROUP_PAD`` rows are (token, query head)
pairs: the ``GROUP`` query heads that share the KV head (7 of MiniCPM-V's 28:4, padded to 8), so GQA reads
each key once for its whole group, with no repeat. It walks the sequence's keys ``BLOCK_N`` at a time through
the block table (a key's block is looked up per key, so ``BLOCK_N`` and the pool's block size are independent),
up to the tile's last visible key (causal, bottom-right aligned: new token ``i`` of a chunk of ``L`` after
``C - L`` cached keys sees keys ``<= C - L + i``), with an online softmax in float32 (base 2). Nothing is
gathered: K and V are read where they lie, ``[slots, kv_heads, head_dim]`` per layer.

Two tile shapes: **decode** tiles (one token per sequence: ``BLOCK_Q`` just large enough for the 16 rows
``tl.dot`` needs) and **prefill** tiles (64 rows). A decode launch may **split** each sequence's keys into
``num_splits`` ranges (flash-decoding): at small batch, one program per (sequence, KV head) would leave most of
the GPU idle; each split writes its partial sum with its running max and denominator, and ``_merge_splits``
combines them. The number of splits is a launch argument (its buffers: ``[tiles, kv_heads, BLOCK_M, splits]``),
so a CUDA graph captured for a batch size serves every context length.

Every sequence-dependent value (context length, query start, block table, tiles) is read from device memory:
a launch has no host sync and, for a fixed number of tiles and splits, fixed shapes (CUDA-graph capturable).

The same source runs on the CPU under Triton's interpreter (``interpret=True``: the kernels are built both ways
here, see ``_build``) and is compiled ahead of time for sm_90/sm_80 by the suite (aot.py, ``launch_configs``).
The interpreter has no bfloat16 ``tl.dot`` (it returns garbage): on the CPU bf16 operands are upcast to float32
for the dots (``DOT_F32``); on the GPU the bf16 dot runs natively.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from minicpmv.engine.kernels.spec import LaunchSpec

LOG2E = 1.4426950408889634
# The kernels call builtins only: triton.language's own jitted helpers (tl.sum, tl.max, tl.cdiv, tl.zeros) exist
# in one mode per process (compiled or interpreted, fixed when triton is imported), and these kernels are
# built in both. Reductions go through the builtin tl.reduce with triton's combine functions, which the
# interpreter recognises (numpy's sum and max) and the compiler inlines.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
MAX_SPLITS = 32  # the most key ranges a decode launch splits a sequence into (power of two: the merge's width)


def _paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stats_ptr, table_ptr, seq_lens_ptr, cu_q_ptr,
                     tiles_ptr, scale, block_size, stride_table, stride_qt, stride_qh, stride_ot, stride_oh,
                     stride_slot, stride_kvh, num_splits,
                     HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                     IEEE: tl.constexpr):  # fmt: skip
    """Grid (tiles, kv_heads, splits). ``tiles_ptr``: [tiles, 2] (sequence, first new token of the tile);
    ``cu_q_ptr``: [B + 1] where each sequence's new tokens start in ``q``; ``seq_lens_ptr``: [B] context lengths
    (cached + new); ``table_ptr``: [B, >= blocks] block ids; ``scale``: softmax scale x log2(e). Without
    ``SPLIT`` the output is written to ``out``; with it, the partial sums to ``part`` [tiles, kv_heads,
    BLOCK_M, splits, HEAD_DIM] and (max, denominator) to ``stats`` [..., splits, 2], both float32."""
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tiles_ptr + 2 * tile)
    first = tl.load(tiles_ptr + 2 * tile + 1)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    context = tl.load(seq_lens_ptr + seq)
    past = context - q_len  # keys cached before this step's tokens

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP_PAD  # new token of the sequence (0 = its first in this step)
    member = rows % GROUP_PAD
    head = kv_head * GROUP + member
    row_ok = (token < q_len) & (member < GROUP)
    position = past + token  # the key index each row sees up to (causal)
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)

    end = past + tl.minimum(first + BLOCK_Q, q_len)  # keys this tile's last token sees (exclusive)
    key_tiles = (end + BLOCK_N - 1) // BLOCK_N
    per_split = (key_tiles + num_splits - 1) // num_splits
    lo = split * per_split
    hi = tl.minimum(lo + per_split, key_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    for key_tile in range(lo, hi):
        keys = key_tile * BLOCK_N + offs_n
        key_ok = keys < end
        block = tl.load(table_row + keys // block_size, mask=key_ok, other=0)
        slot = block.to(tl.int64) * block_size + keys % block_size
        offset = slot[:, None] * stride_slot + kv_head * stride_kvh + dims[None, :]
        # An FP8 pool's K/V become the query's dtype here, in registers (a no-op for a pool of that dtype).
        k = tl.load(k_ptr + offset, mask=key_ok[:, None], other=0.0).to(q_ptr.dtype.element_ty)
        v = tl.load(v_ptr + offset, mask=key_ok[:, None], other=0.0).to(q_ptr.dtype.element_ty)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = key_ok[None, :] & (keys[None, :] <= position[:, None])
        s = tl.where(visible, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SPLIT:
        row_id = ((tile * tl.num_programs(1) + kv_head) * BLOCK_M + rows).to(tl.int64) * num_splits + split
        tl.store(stats_ptr + row_id * 2, m_i)
        tl.store(stats_ptr + row_id * 2 + 1, l_i)
        tl.store(part_ptr + row_id[:, None] * HEAD_DIM + dims[None, :], acc)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


def _merge_splits(part_ptr, stats_ptr, out_ptr, seq_lens_ptr, cu_q_ptr, tiles_ptr, num_splits, stride_ot,
                  stride_oh, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  BLOCK_Q: tl.constexpr, SPLITS_PAD: tl.constexpr):  # fmt: skip
    """Grid (tiles, kv_heads, BLOCK_M): one output row from its splits' partial sums (``_paged_attention``
    with ``SPLIT``); splits that saw no key (max -inf, denominator 0) weigh nothing."""
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.program_id(2)
    seq = tl.load(tiles_ptr + 2 * tile)
    token = tl.load(tiles_ptr + 2 * tile + 1) + row // GROUP_PAD
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    member = row % GROUP_PAD
    if (token < q_len) & (member < GROUP):
        splits = tl.arange(0, SPLITS_PAD)
        split_ok = splits < num_splits
        row_id = ((tile * tl.num_programs(1) + kv_head) * BLOCK_M + row).to(tl.int64) * num_splits + splits
        m = tl.load(stats_ptr + row_id * 2, mask=split_ok, other=float("-inf"))
        l_split = tl.load(stats_ptr + row_id * 2 + 1, mask=split_ok, other=0.0)
        m_max = tl.reduce(m, 0, _MAX)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        weight = tl.math.exp2(m - m_safe)
        denominator = tl.reduce(weight * l_split, 0, _SUM)
        dims = tl.arange(0, HEAD_DIM)
        part = tl.load(part_ptr + row_id[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
        out = tl.reduce(part * weight[:, None], 0, _SUM) / tl.where(denominator == 0.0, 1.0, denominator)
        head = kv_head * GROUP + member
        q_row = (q_start + token).to(tl.int64)
        tl.store(out_ptr + q_row * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _build(interpret: bool):
    """(attention kernel, merge kernel), jitted for the GPU or for Triton's interpreter (CPU tensors). Both
    variants of the same source live side by side: which one a launch takes follows its tensors' device, not a
    process-wide TRITON_INTERPRET."""
    with knobs.runtime.scope():
        knobs.runtime.interpret = interpret
        # Arguments that change from step to step are not specialised (Triton would compile a variant for a
        # value of 1 and for multiples of 16): a step never waits for a compile because its widest block table
        # or its split count changed.
        return (triton.jit(_paged_attention, do_not_specialize=["stride_table", "num_splits"]),
                triton.jit(_merge_splits, do_not_specialize=["num_splits"]))  # fmt: skip


def kernels(interpret: bool = False):
    """The jitted kernels (the GPU variant by default; what the AOT compilation takes)."""
    return _build(interpret)


@dataclass(frozen=True)
class TileConfig:
    """A tile shape and its launch options: ``block_q`` new tokens per tile (rows: block_q x the padded query
    group), ``block_n`` keys per iteration."""

    block_q: int
    block_n: int
    num_warps: int
    num_stages: int


def group_pad(num_heads: int, num_kv_heads: int) -> int:
    return triton.next_power_of_2(num_heads // num_kv_heads)


def tile_configs(num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> tuple[TileConfig, TileConfig]:  # fmt: skip
    """(decode, prefill) tile shapes for a model's heads and a dtype. Rows per tile: 16 for decode (the least
    ``tl.dot`` takes; one token, the rest of the rows masked), 64 for prefill; 64 keys per iteration, 4 warps.
    Float32 (its dots exact, ``input_precision="ieee"``: no tensor cores) takes 32 prefill rows, 16 keys and 8
    warps: larger tiles or 4 warps make ptxas spill registers on sm_90 or sm_80 (test_kernel_aot.py)."""
    pad = group_pad(num_heads, num_kv_heads)
    if dtype == torch.float32:
        prefill_rows, block_n, warps = 32, 16, 8
    else:
        prefill_rows, block_n, warps = 64, 64, 4
    decode = TileConfig(block_q=max(1, 16 // pad), block_n=block_n, num_warps=warps, num_stages=2)
    prefill = TileConfig(block_q=max(1, prefill_rows // pad), block_n=block_n, num_warps=warps, num_stages=2)
    return decode, prefill


def rows_per_tile(config: TileConfig, num_heads: int, num_kv_heads: int) -> int:
    return config.block_q * group_pad(num_heads, num_kv_heads)


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                    table: torch.Tensor, seq_lens: torch.Tensor, cu_q: torch.Tensor, tiles: torch.Tensor,
                    block_size: int, config: TileConfig, num_splits: int = 1) -> None:  # fmt: skip
    """Attention of the new tokens in ``tiles`` into ``out`` (rows of other tokens are left as they are).

    ``q``/``out`` [T, Hq, D]; ``keys``/``values`` [slots, Hk, D] (a layer's pool: ``q``'s dtype, or FP8 e4m3
    under a bf16/fp16 ``q``, converted as read); ``table`` [B, W] block ids (int32/int64, rows past a
    sequence's blocks unread);
    ``seq_lens`` [B] context lengths; ``cu_q`` [B + 1] where each sequence's new tokens start in ``q``;
    ``tiles`` [N, 2] (sequence, first new token) with ``config.block_q`` tokens each; ``num_splits`` key ranges
    per tile (1: no split; at most MAX_SPLITS). CPU tensors run under Triton's interpreter."""
    num_tiles = tiles.shape[0]
    if num_tiles == 0:
        return
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be 1..{MAX_SPLITS}, got {num_splits}")
    total, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    pad = triton.next_power_of_2(group)
    interpret = q.device.type != "cuda"
    attend, merge = _build(interpret)
    split = num_splits > 1
    rows = config.block_q * pad
    if split:
        part = torch.empty((num_tiles, num_kv_heads, rows, num_splits, head_dim), dtype=torch.float32,
                           device=q.device)  # fmt: skip
        stats = torch.empty((num_tiles, num_kv_heads, rows, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    scale = LOG2E / math.sqrt(head_dim)
    attend[(num_tiles, num_kv_heads, num_splits)](
        q, keys, values, out, part, stats, table, seq_lens, cu_q, tiles, scale, block_size, table.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), keys.stride(0), keys.stride(1), num_splits,
        HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=pad, BLOCK_Q=config.block_q, BLOCK_N=config.block_n, SPLIT=split,
        DOT_F32=interpret and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split:
        merge[(num_tiles, num_kv_heads, rows)](
            part, stats, out, seq_lens, cu_q, tiles, num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            GROUP=group, GROUP_PAD=pad, BLOCK_Q=config.block_q, SPLITS_PAD=MAX_SPLITS, num_warps=1,
        )  # fmt: skip


# ---------------------------------------------------------------- what the engine can launch (AOT)

# (query heads, KV heads, head dim) of the models the engine runs: MiniCPM-V 2.6's LLM (Qwen2-7B) and the tiny
# random-weight checkpoint of the tests and of serve.sh --demo.
MODEL_HEADS = ((28, 4, 128), (4, 2, 64))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv"}
FP8_ARCHS = (90,)  # e4m3 needs sm_89+: Triton refuses fp8e4nv on sm_80 (kv_pool.fp8_kv_dtype checks the GPU)


def launch_configs() -> list[LaunchSpec]:
    """Every configuration ``paged_attention`` launches for the models and dtypes the engine serves: per
    (heads, dtype, KV dtype), the decode tile with and without split, the prefill tile, and the merge; an FP8 KV
    pool under bf16/fp16 on Hopper only."""
    attend, merge = kernels()
    specs = []
    # FP8 under bf16/fp16 (kv_pool.fp8_kv_dtype refuses float32 models on CUDA: their tiles would spill).
    kv_dtypes = [(dtype, dtype) for dtype in DTYPES] + [(dtype, torch.float8_e4m3fn) for dtype in DTYPES[:2]]
    for num_heads, num_kv_heads, head_dim in MODEL_HEADS:
        group, pad = num_heads // num_kv_heads, group_pad(num_heads, num_kv_heads)
        for dtype, kv_dtype in kv_dtypes:
            t, kv = _TRITON_TYPE[dtype], _TRITON_TYPE[kv_dtype]
            fp8 = kv_dtype == torch.float8_e4m3fn
            archs = FP8_ARCHS if fp8 else (90, 80)
            decode, prefill = tile_configs(num_heads, num_kv_heads, head_dim, dtype)
            signature = {
                "q_ptr": f"*{t}", "k_ptr": f"*{kv}", "v_ptr": f"*{kv}", "out_ptr": f"*{t}", "part_ptr": "*fp32",
                "stats_ptr": "*fp32", "table_ptr": "*i64", "seq_lens_ptr": "*i64", "cu_q_ptr": "*i64",
                "tiles_ptr": "*i64", "scale": "fp32", "block_size": "i32", "stride_table": "i32",
                "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32", "stride_oh": "i32",
                "stride_slot": "i32", "stride_kvh": "i32", "num_splits": "i32",
            }  # fmt: skip
            aligned = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "part_ptr", "stats_ptr", "table_ptr", "seq_lens_ptr",
                       "cu_q_ptr", "tiles_ptr", "block_size", "stride_qt", "stride_qh", "stride_ot",
                       "stride_oh", "stride_slot", "stride_kvh")  # fmt: skip
            for label, config, split in (("decode", decode, False), ("decode-split", decode, True),
                                         ("prefill", prefill, False)):  # fmt: skip
                constexprs = {"HEAD_DIM": head_dim, "GROUP": group, "GROUP_PAD": pad, "BLOCK_Q": config.block_q,
                              "BLOCK_N": config.block_n, "SPLIT": split, "DOT_F32": False,
                              "IEEE": dtype == torch.float32}  # fmt: skip
                name = f"attention-{label} {num_heads}:{num_kv_heads}x{head_dim} {t}" + (" kv-fp8" if fp8 else "")
                specs.append(LaunchSpec(name, attend, signature, constexprs, config.num_warps, config.num_stages,
                                        aligned, archs))  # fmt: skip
            if fp8:
                continue  # the merge reads float32 partial sums: the same as without FP8
            merge_signature = {
                "part_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": f"*{t}", "seq_lens_ptr": "*i64",
                "cu_q_ptr": "*i64", "tiles_ptr": "*i64", "num_splits": "i32", "stride_ot": "i32", "stride_oh": "i32",
            }  # fmt: skip
            specs.append(LaunchSpec(f"merge {num_heads}:{num_kv_heads}x{head_dim} {t}", merge, merge_signature,
                                    {"HEAD_DIM": head_dim, "GROUP": group, "GROUP_PAD": pad,
                                     "BLOCK_Q": decode.block_q, "SPLITS_PAD": MAX_SPLITS}, 1, 1,
                                    ("part_ptr", "stats_ptr", "out_ptr", "stride_ot", "stride_oh")))  # fmt: skip
    return specs
