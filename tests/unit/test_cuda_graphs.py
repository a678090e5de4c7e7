"""The static-shape decode step that CUDA graphs replay (minicpmv/engine/cuda_graphs.py), run on the CPU
without capture: the same arithmetic, buffers, buckets, padding rows and scratch block as on the GPU.

The capture itself needs CUDA: tests/gpu/test_cuda.py compares graphs on and off there.
"""

from __future__ import annotations

import functools

import pytest
import torch

from minicpmv.engine import engine as engine_module
from minicpmv.engine.attention import gqa_decode_attention
from minicpmv.engine.cuda_graphs import DecodeGraphs, batch_buckets, context_buckets
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.model_runner import ModelRunner
from tests.unit.test_engine_core import page, request


def test_batch_buckets_are_fine_where_decoding_is_fast_and_end_at_max_num_seqs():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(1) == [1]
    assert batch_buckets(10) == [1, 2, 4, 8, 10]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 100]


def test_context_buckets_double_from_256_tokens_to_the_limit():
    assert context_buckets(16, 8192) == [16, 32, 64, 128, 256, 512]
    assert context_buckets(16, 1000) == [16, 32, 63]  # 1,000 tokens = 63 blocks
    assert context_buckets(16, 100) == [7]


def _graphs(block_size: int = 16, max_num_seqs: int = 8, max_context: int = 8192) -> DecodeGraphs:
    """Buckets only: no forward runs, nothing is captured."""
    return DecodeGraphs(None, block_size=block_size, scratch_block=0, max_num_seqs=max_num_seqs,
                        max_context=max_context, device=torch.device("cpu"), capture=False)  # fmt: skip


def test_a_context_one_token_past_a_width_takes_the_next_width():
    graphs = _graphs()
    assert graphs.widths == [16, 32, 64, 128, 256, 512] and graphs.max_context == 8192
    for context, width in [(1, 16), (16, 16), (17, 16), (255, 16), (256, 16), (257, 32), (511, 32), (512, 32),
                           (513, 64), (1024, 64), (1025, 128), (4096, 256), (4097, 512), (8192, 512)]:  # fmt: skip
        assert graphs.bucket(1, context) == (1, width), context
    assert graphs.bucket(1, 8193) is None
    assert [graphs.bucket(n, 300) for n in (1, 2, 3, 4, 5, 8)] == [(1, 32), (2, 32), (4, 32), (4, 32), (8, 32), (8, 32)]
    assert graphs.bucket(9, 300) is None


def test_every_context_gets_the_smallest_width_that_holds_it():
    """A width of w blocks holds the keys of positions 0 .. w * block_size - 1: a context one token longer
    needs the next width (else its newest token's slot is outside the gathered ones)."""
    for block_size, max_context in [(16, 2048), (48, 1000), (5, 700)]:
        graphs = _graphs(block_size, max_context=max_context)
        assert graphs.max_context == graphs.widths[-1] * block_size >= max_context
        for context in range(1, graphs.max_context + 1):
            _, width = graphs.bucket(1, context)
            assert width * block_size >= context, (block_size, context, width)
            smaller = [w for w in graphs.widths if w < width]
            assert not smaller or smaller[-1] * block_size < context, (block_size, context, width)
        assert graphs.bucket(1, graphs.max_context + 1) is None
    # A block size that does not divide 256: the first width is still at least 256 tokens.
    assert context_buckets(48, 1000) == [6, 12, 21]
    assert _graphs(48, max_context=1000).bucket(1, 289) == (1, 12)


def test_grouped_query_heads_as_rows_equal_sdpa_with_enable_gqa():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 28, 16, generator=generator)
    keys = torch.randn(3, 40, 4, 16, generator=generator)
    values = torch.randn(3, 40, 4, 16, generator=generator)
    lengths = torch.tensor([40, 7, 1])
    mask = (torch.arange(40)[None, :] < lengths[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(gqa_decode_attention(q, keys, values, mask), expected, rtol=1e-5, atol=1e-6)


def _engine(tiny_full, monkeypatch, static: bool, graph_max_len: int = 8192) -> Engine:
    runner = functools.partial(ModelRunner, static_decode=static)
    monkeypatch.setattr(engine_module, "ModelRunner", runner)
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=96,
                          cuda_graph_max_len=graph_max_len, enable_prefix_caching=False)  # fmt: skip
    return Engine.from_pretrained(tiny_full, dtype="float32", config=config)


def _run_batch(engine: Engine) -> list[tuple[list[int], list[float]]]:
    """Three requests decoding together (batch bucket 4: one padding row), one of them with a page."""
    reqs = [request("Count to ten.", max_tokens=24, logprobs=True),
            request("Read the page.", [page(5)], max_tokens=20, logprobs=True),
            request("A " * 90 + "longer prompt.", max_tokens=30, logprobs=True)]  # fmt: skip
    handles = [engine.submit(r) for r in reqs]
    out = []
    for handle in handles:
        choice = handle.result().choices[0]
        assert choice.error is None
        out.append((choice.token_ids, [entry.logprob for entry in choice.logprobs]))
    return out


def test_static_decode_gives_the_eager_ids_logprobs_and_kv_and_pads_into_the_scratch_block(tiny_full, monkeypatch):
    eager = _engine(tiny_full, monkeypatch, static=False)
    static = _engine(tiny_full, monkeypatch, static=True)
    try:
        assert eager.runner.decode_graphs is None and static.runner.pool.scratch_block == 96
        scratch = static.runner.pool.scratch_block * 16
        before = static.runner.pool.keys[0][scratch:].clone()
        expected, got = _run_batch(eager), _run_batch(static)
        graphs = static.runner.decode_graphs
        assert graphs.num_steps >= 25 and graphs.num_replays == 0  # the static forward ran, uncaptured (CPU)
        for (ids_e, lp_e), (ids_s, lp_s) in zip(expected, got, strict=True):
            assert ids_s == ids_e
            torch.testing.assert_close(torch.tensor(lp_s), torch.tensor(lp_e), rtol=0, atol=1e-4)
        # Every sequence block holds the same K/V (nothing written where a sequence reads), and padding rows
        # wrote into the scratch block. Static (padded batch) vs eager K/V differ by at most 6.8e-6 (AMD EPYC,
        # native and AVX2 kernels; 0 with MKL_CBWR=COMPATIBLE); a K/V written to a neighbour's slot is off by >= 1.
        slots = eager.runner.pool.num_slots
        for layer in (0, len(eager.runner.pool.keys) - 1):
            torch.testing.assert_close(static.runner.pool.keys[layer][:slots], eager.runner.pool.keys[layer],
                                       rtol=1e-5, atol=5e-5)  # fmt: skip
            torch.testing.assert_close(static.runner.pool.values[layer][:slots], eager.runner.pool.values[layer],
                                       rtol=1e-5, atol=5e-5)  # fmt: skip
        assert not torch.equal(static.runner.pool.keys[0][scratch:], before)
    finally:
        eager.shutdown()
        static.shutdown()


def test_static_decode_past_256_tokens_takes_the_second_width_and_gives_the_eager_ids(tiny_full, monkeypatch):
    eager = _engine(tiny_full, monkeypatch, static=False)
    static = _engine(tiny_full, monkeypatch, static=True)
    try:
        graphs = static.runner.decode_graphs
        seen: list[tuple[int, tuple[int, int] | None]] = []
        bucket = graphs.bucket

        def recording(num_seqs: int, max_context_len: int):
            seen.append((max_context_len, bucket(num_seqs, max_context_len)))
            return seen[-1][1]

        monkeypatch.setattr(graphs, "bucket", recording)
        long_text = "B " * 229 + "end."  # 250 prompt tokens: decodes from context 251 to 259
        assert len(eager.prepare(request(long_text)).prompt_ids) == 250
        outputs = []
        for engine in (eager, static):
            # A short sequence decodes next to the long one: its row is masked past its own context.
            handles = [engine.submit(request("Count to ten.", max_tokens=16, logprobs=True)),
                       engine.submit(request(long_text, max_tokens=10, logprobs=True))]  # fmt: skip
            results = [handle.result().choices[0] for handle in handles]
            assert all(choice.error is None for choice in results), [choice.error for choice in results]
            outputs.append([(c.token_ids, [entry.logprob for entry in c.logprobs]) for c in results])
        for (ids_e, lp_e), (ids_s, lp_s) in zip(*outputs, strict=True):
            assert ids_s == ids_e
            torch.testing.assert_close(torch.tensor(lp_s), torch.tensor(lp_e), rtol=0, atol=1e-4)
        widths = {context: chosen[1] for context, chosen in seen if chosen is not None}
        assert widths[255] == widths[256] == 16 and widths[257] == widths[259] == 32
        assert (2, 32) in [chosen for _, chosen in seen]  # both rows in the wider bucket
        assert graphs.num_steps == len(seen) and graphs.num_replays == 0
    finally:
        eager.shutdown()
        static.shutdown()


def test_contexts_past_the_graph_limit_and_prefill_steps_run_eagerly(tiny_full, monkeypatch):
    eager = _engine(tiny_full, monkeypatch, static=False)
    capped = _engine(tiny_full, monkeypatch, static=True, graph_max_len=64)
    try:
        long = request("A " * 90 + "longer prompt.", max_tokens=12)  # its context is past 64 tokens throughout
        assert capped.generate(long).choices[0].token_ids == eager.generate(long).choices[0].token_ids
        assert capped.runner.decode_graphs.num_steps == 0
        short = request("Hi.", max_tokens=60)  # a short prompt: decodes statically up to position 63
        assert capped.generate(short).choices[0].token_ids == eager.generate(short).choices[0].token_ids
        prompt = capped.generate(request("Hi.", max_tokens=1)).prompt_tokens
        assert capped.runner.decode_graphs.num_steps == 64 - prompt
    finally:
        eager.shutdown()
        capped.shutdown()


@pytest.mark.parametrize("value", [0, -5])
def test_cuda_graph_max_len_must_be_positive(value):
    with pytest.raises(ValueError, match="cuda_graph_max_len"):
        EngineConfig(cuda_graph_max_len=value)
