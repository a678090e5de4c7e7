"""The paged attention kernel (minicpmv/engine/kernels/paged_attention.py) under Triton's interpreter, against
an independent float64 reference: random pools, shuffled block tables, GQA 28:4 x 128 (MiniCPM-V) and the tiny
model's 4:2 x 64, block sizes 16 (the engine's) and others, contexts 1..several blocks + 1 across block
boundaries, decode rows, prefill chunks after a cached prefix, fresh prompts, split decode, and the backend
(triton_attention.py) on a mixed step. bf16's ``tl.dot`` is not supported by the interpreter: bf16 runs with
its dots upcast (``DOT_F32``) here; the native bf16 variant is compiled by test_kernel_aot.py and checked on
the GPU (devtools/device_checks.py through the engine's start-up self-test).

The same source is what the GPU runs: a planted off-by-one in the block lookup (``keys // block_size`` -> ``(keys
+ 1) // block_size``) or in the causal mask (``<=`` -> ``<``) fails these tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minicpmv.engine.attention import AttentionMetadata, ReferenceAttention, mismatch
from minicpmv.engine.kernels import paged_attention as pa
from minicpmv.engine.triton_attention import TritonAttention, decode_splits

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

SHAPES = [(28, 4, 128), (4, 2, 64)]  # (query heads, KV heads, head dim)


def _pool(generator, num_blocks, block_size, kv_heads, dim, dtype):
    shape = (num_blocks * block_size, kv_heads, dim)
    return (torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype))


def _tables(generator, contexts, block_size, num_blocks):
    """Shuffled, disjoint block tables, padded with block 0 (never read past a sequence's own blocks)."""
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for context in contexts:
        blocks = -(-context // block_size)
        tables.append(order[used : used + blocks])
        used += blocks
    assert used <= num_blocks
    width = max(len(t) for t in tables)
    return tables, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)


def _reference(q, keys, values, tables, query_lens, contexts, block_size) -> torch.Tensor:
    """float64, one sequence at a time: new token i of a chunk of L after C - L cached keys sees keys <= C - L + i."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // keys.shape[1]
    start = 0
    for table, length, context in zip(tables, query_lens, contexts, strict=True):
        position = torch.arange(context)
        slots = torch.tensor(table)[position // block_size] * block_size + position % block_size
        k = keys[slots].double().repeat_interleave(group, 1)
        v = values[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + length].double(), k) / math.sqrt(q.shape[2])
        visible = position[None, :] <= (context - length + torch.arange(length))[:, None]
        probabilities = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start : start + length] = torch.einsum("hqk,khd->qhd", probabilities, v)
        start += length
    return out


def _launch(q, keys, values, table, query_lens, contexts, block_size, config, splits=1, tiles=None):
    """The kernel over every sequence of the step with ``config``'s tile height."""
    cu = torch.tensor(np.concatenate([[0], np.cumsum(query_lens)]), dtype=torch.int64)
    if tiles is None:
        tiles = [[b, first] for b, length in enumerate(query_lens) for first in range(0, length, config.block_q)]
    out = torch.full_like(q, float("nan"))
    pa.paged_attention(q, keys, values, out, table, torch.tensor(contexts), cu, torch.tensor(tiles).reshape(-1, 2),
                       block_size, config, splits)  # fmt: skip
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}:{s[1]}x{s[2]}")
@pytest.mark.parametrize("block_size", [16, 5])
def test_decode_rows_at_every_block_boundary(shape, block_size):
    """One new token per sequence, contexts 1 .. three blocks + 1, every boundary and its neighbours; float32."""
    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(block_size)
    contexts = sorted({1, 2, block_size - 1, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1,
                       3 * block_size, 3 * block_size + 1} - {0})  # fmt: skip
    keys, values = _pool(generator, 40, block_size, kv_heads, dim, torch.float32)
    tables, table = _tables(generator, contexts, block_size, 40)
    query_lens = [1] * len(contexts)
    q = torch.randn(len(contexts), heads, dim, generator=generator)
    decode, _ = pa.tile_configs(heads, kv_heads, dim, torch.float32)
    got = _launch(q, keys, values, table, query_lens, contexts, block_size, decode)
    expected = _reference(q, keys, values, tables, query_lens, contexts, block_size)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}:{s[1]}x{s[2]}")
def test_prefill_chunks_fresh_and_after_a_cached_prefix(shape):
    """Chunks of 1, 7, 8, 9 and 13 new tokens (tiles cut inside and at a chunk's end) after 0, 3, 16 and 40
    cached tokens, with the decode tile height and the prefill one; float32."""
    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(1)
    block_size = 16
    query_lens = [7, 9, 13, 8, 1, 13]
    contexts = [7, 12, 29, 56, 41, 13]  # cached: 0, 3, 16, 48, 40, 0
    keys, values = _pool(generator, 30, block_size, kv_heads, dim, torch.float32)
    tables, table = _tables(generator, contexts, block_size, 30)
    q = torch.randn(sum(query_lens), heads, dim, generator=generator)
    expected = _reference(q, keys, values, tables, query_lens, contexts, block_size)
    for config in pa.tile_configs(heads, kv_heads, dim, torch.float32):
        got = _launch(q, keys, values, table, query_lens, contexts, block_size, config)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_decode_merges_to_the_same_result(splits):
    """Key ranges per sequence merged by ``_merge_splits``, including ranges with no key at all (a 1-token
    context split 7 ways) and ranges cut inside a block; float32, GQA 28:4."""
    heads, kv_heads, dim = 28, 4, 128
    generator = torch.Generator().manual_seed(splits)
    block_size = 16
    contexts = [1, 40, 200]
    keys, values = _pool(generator, 20, block_size, kv_heads, dim, torch.float32)
    tables, table = _tables(generator, contexts, block_size, 20)
    q = torch.randn(3, heads, dim, generator=generator)
    decode, _ = pa.tile_configs(heads, kv_heads, dim, torch.float32)
    got = _launch(q, keys, values, table, [1, 1, 1], contexts, block_size, decode, splits)
    expected = _reference(q, keys, values, tables, [1, 1, 1], contexts, block_size)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)


def test_only_the_tiles_given_are_written():
    """Rows of sequences without a tile keep what ``out`` held (the backend fills them from another launch)."""
    heads, kv_heads, dim = 4, 2, 64
    generator = torch.Generator().manual_seed(2)
    keys, values = _pool(generator, 8, 16, kv_heads, dim, torch.float32)
    tables, table = _tables(generator, [5, 9], 16, 8)
    q = torch.randn(2, heads, dim, generator=generator)
    decode, _ = pa.tile_configs(heads, kv_heads, dim, torch.float32)
    got = _launch(q, keys, values, table, [1, 1], [5, 9], 16, decode, tiles=[[1, 0]])
    assert torch.isnan(got[0]).all() and not torch.isnan(got[1]).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_within_the_self_tests_relative_bound(dtype):
    """fp16 (native dots under the interpreter) and bf16 (dots upcast here), mixed decode and chunks, against
    the float64 reference: within attention.py's self-test bound (2 ulps of bf16 relative, 1e-2 absolute)."""
    heads, kv_heads, dim = 28, 4, 128
    generator = torch.Generator().manual_seed(3)
    query_lens, contexts = [1, 9, 1], [33, 25, 70]
    keys, values = _pool(generator, 16, 16, kv_heads, dim, dtype)
    tables, table = _tables(generator, contexts, 16, 16)
    q = torch.randn(sum(query_lens), heads, dim, generator=generator).to(dtype)
    expected = _reference(q, keys, values, tables, query_lens, contexts, 16)
    _, prefill = pa.tile_configs(heads, kv_heads, dim, dtype)
    got = _launch(q, keys, values, table, query_lens, contexts, 16, prefill)
    assert got.dtype == dtype
    assert mismatch(got, expected) is None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}:{s[1]}x{s[2]}")
def test_the_backend_on_a_mixed_step_equals_the_reference_backend(shape):
    """TritonAttention over AttentionMetadata built with its tiling: decode rows (one split into ranges), a
    fresh prompt, a chunk after a cached prefix, in one packed step; float32 against ReferenceAttention."""
    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(4)
    block_size = 16
    query_lens, contexts = [1, 11, 1, 20, 1], [600, 11, 17, 52, 1]
    keys, values = _pool(generator, 50, block_size, kv_heads, dim, torch.float32)
    tables, _ = _tables(generator, contexts, block_size, 50)
    q = torch.randn(sum(query_lens), heads, dim, generator=generator)
    cpu = torch.device("cpu")
    plain = AttentionMetadata.build(query_lens, contexts, tables, block_size, cpu)
    k, v = keys[plain.slot_mapping], values[plain.slot_mapping]
    expected = ReferenceAttention()(q, k, v, keys, values, plain)
    backend = TritonAttention(heads, kv_heads, dim, torch.float32, cpu)
    backend.sm_count = 8  # as a small GPU would: the 600-token decode splits into ranges
    meta = AttentionMetadata.build(query_lens, contexts, tables, block_size, cpu, tiling=backend.tiling)
    assert meta.slots is None and meta.decode_tiles.tolist() == [[0, 0], [2, 0], [4, 0]]
    assert backend.splits(3, meta.max_decode_context) > 1
    torch.testing.assert_close(backend(q, k, v, keys, values, meta), expected, rtol=1e-5, atol=2e-6)


def test_decode_splits_fill_the_gpu_and_keep_ranges_long():
    assert decode_splits(64, 4, 2048, 132) == 2  # 256 programs: twice 132 SMs wants 2 ranges
    assert decode_splits(64, 4, 200, 132) == 1  # under 2 x 256 keys: not worth a merge
    assert decode_splits(1, 4, 8192, 132) == 32  # one long sequence: 32 ranges of 256 keys
    assert decode_splits(1, 4, 1 << 20, 132) == pa.MAX_SPLITS
    assert decode_splits(16, 4, 4096, 132) == 5
    assert decode_splits(3, 4, 8192, 0) == 1  # the CPU (interpreter): no split


def test_tiles_cut_each_chunk_and_leave_fresh_prompts_to_varlen_when_asked():
    from minicpmv.engine.attention import Tiling

    q, ctx = np.array([1, 5, 3, 17]), np.array([9, 5, 3, 40])
    starts = np.array([0, 1, 6, 9])
    kernel_only = Tiling(2, 8).arrays(q, ctx, starts)
    assert kernel_only["decode_tiles"].tolist() == [[0, 0]]
    assert kernel_only["prefill_tiles"].tolist() == [[1, 0], [2, 0], [3, 0], [3, 8], [3, 16]]
    assert "fresh_rows" not in kernel_only
    with_varlen = Tiling(2, 8, fresh_elsewhere=True).arrays(q, ctx, starts)
    assert with_varlen["prefill_tiles"].tolist() == [[3, 0], [3, 8], [3, 16]]
    assert with_varlen["fresh_rows"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert with_varlen["fresh_cu"].tolist() == [0, 5, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_an_fp8_pool_is_read_as_its_values_upcast(dtype):
    """kv_cache_dtype "fp8": the kernel converts e4m3 K/V to the query's dtype as it reads them; the result is
    attention over those values (the reference reads the same values upcast): exact in float32."""
    heads, kv_heads, dim = 28, 4, 128
    generator = torch.Generator().manual_seed(5)
    query_lens, contexts = [1, 9, 1], [33, 25, 70]
    keys, values = _pool(generator, 16, 16, kv_heads, dim, torch.float32)
    keys, values = (x.to(torch.float8_e4m3fn) for x in (keys, values))
    tables, table = _tables(generator, contexts, 16, 16)
    q = torch.randn(sum(query_lens), heads, dim, generator=generator).to(dtype)
    expected = _reference(q, keys.to(dtype), values.to(dtype), tables, query_lens, contexts, 16)
    for config in pa.tile_configs(heads, kv_heads, dim, dtype):
        got = _launch(q, keys, values, table, query_lens, contexts, 16, config)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)
        else:
            assert mismatch(got, expected) is None
