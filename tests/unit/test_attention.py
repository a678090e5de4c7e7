"""Attention over the paged pool: metadata (slot mapping, block tables, decode group) and the reference path
against plain dense attention. The CUDA backend runs the same self-test at start-up on a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpmv.engine.attention import AttentionMetadata, ReferenceAttention, select_backend
from minicpmv.engine.kv_pool import KVPool, PoolShape


def test_slot_mapping_and_context_slots_follow_the_block_tables():
    meta = AttentionMetadata.build([1, 3], [6, 5], [[7, 2], [4, 9]], block_size=4, device=torch.device("cpu"))
    # sequence 0: tokens 0..5 in blocks 7 (slots 28-31) and 2 (slots 8-9); its new token is token 5 -> slot 9
    assert meta.context_slots(0).tolist() == [28, 29, 30, 31, 8, 9]
    # sequence 1: tokens 0..4 in blocks 4 (16-19) and 9 (36); new tokens 2, 3, 4 -> slots 18, 19, 36
    assert meta.context_slots(1).tolist() == [16, 17, 18, 19, 36]
    assert meta.slot_mapping.tolist() == [9, 18, 19, 36]
    assert meta.decode_rows.tolist() == [0] and meta.decode_mask.shape == (1, 1, 1, 8)
    assert meta.decode_mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    packed, cu_q, cu_k, max_q, max_k = meta.varlen_inputs()
    assert packed.tolist() == [28, 29, 30, 31, 8, 9, 16, 17, 18, 19, 36]
    assert (cu_q.tolist(), cu_k.tolist(), max_q, max_k) == ([0, 1, 4], [0, 6, 11], 3, 6)
    assert meta.prefills == [(1, 1, 3, 5)]


def dense(q, keys, values, causal_offset):
    """Plain attention of q [Tq, Hq, D] over keys/values [Tk, Hk, D], query i seeing keys j <= i + offset."""
    repeat = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + causal_offset
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v)


def test_reference_attention_equals_dense_attention_for_mixed_steps():
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(PoolShape(1, 2, 8, 4, torch.float32), num_blocks=16, device=torch.device("cpu"))
    pool.keys[0].copy_(torch.randn(pool.keys[0].shape, generator=gen))
    pool.values[0].copy_(torch.randn(pool.values[0].shape, generator=gen))
    query_lens, context_lens, tables = [1, 4, 3, 1], [9, 4, 7, 2], [[5, 1, 12], [3], [8, 0], [14]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, 4, torch.device("cpu"))
    q = torch.randn(sum(query_lens), 6, 8, generator=gen)
    k = torch.randn(sum(query_lens), 2, 8, generator=gen)
    v = torch.randn(sum(query_lens), 2, 8, generator=gen)
    pool.store(0, meta.slot_mapping, k, v)
    out = ReferenceAttention()(q, k, v, pool.keys[0], pool.values[0], meta)
    start = 0
    for b, (length, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        slots = meta.context_slots(b)
        expected = dense(q[start : start + length], pool.keys[0][slots], pool.values[0][slots], ctx - length)
        torch.testing.assert_close(out[start : start + length], expected, atol=1e-5, rtol=1e-5)
        start += length


def test_the_cpu_takes_the_reference_backend():
    assert select_backend("auto", torch.device("cpu"), torch.float32).name == "reference"


def test_the_pool_allocates_exactly_its_budget_in_whole_blocks():
    shape = PoolShape(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    budget = 3 << 20
    pool = KVPool.from_budget(shape, budget, torch.device("cpu"))
    allocated = sum(t.numel() * t.element_size() for t in (*pool.keys, *pool.values))
    assert allocated == pool.nbytes == pool.num_blocks * shape.bytes_per_block
    assert budget - shape.bytes_per_block < allocated <= budget


def test_decoding_sequences_gather_only_their_own_widths():
    tables = [[1], [2, 3, 4, 5, 6, 7, 8, 9]]  # a short decoding context beside a long prefill chunk
    meta = AttentionMetadata.build([1, 16], [3, 32], tables, block_size=4, device=torch.device("cpu"))
    assert meta.decode_slots.shape == (1, 4) and meta.slots.shape == (2, 32)


def test_the_cuda_budget_is_a_share_of_the_gpu_less_the_weights_and_never_more_than_is_free(monkeypatch):
    from minicpmv.engine.kv_pool import pool_bytes

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 16 * gib)  # this process: weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (124 * gib, 140 * gib))
    assert pool_bytes(torch.device("cuda"), None, 0.9) == int(140 * gib * 0.9 - 16 * gib)
    assert pool_bytes(torch.device("cuda"), None, 0.45) == int(140 * gib * 0.45 - 16 * gib)
    # a second model on a GPU the first one mostly took: what is free, not a share it can't have
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 140 * gib))
    assert pool_bytes(torch.device("cuda"), None, 0.9) == int(10 * gib * 0.95)
    assert pool_bytes(torch.device("cuda"), 512, 0.9) == 512 << 20


def test_auto_takes_the_faster_backend_and_keeps_the_timings():
    from minicpmv.engine.attention import fastest

    class Fake:
        timings_ms = None

        def __init__(self, name):
            self.name = name

    slow, quick = Fake("varlen"), Fake("reference")
    chosen = fastest([slow, quick], lambda b: {"varlen": 3.0, "reference": 1.5}[b.name])
    assert chosen is quick and slow.timings_ms == quick.timings_ms == {"varlen": 3.0, "reference": 1.5}
