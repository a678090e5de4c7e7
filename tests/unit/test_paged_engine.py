"""The engine on the paged Triton kernel, end to end on the CPU through Triton's interpreter: the wiring of
kernels/paged_attention.py into the model runner (tiles, block tables, context lengths, the CUDA-graph static
forward without context buckets), not only the kernel. Tiny model, a few steps each: the interpreter is slow.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from minicpmv.engine import engine as engine_module
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.model_runner import ModelRunner
from minicpmv.engine.triton_attention import TritonAttention
from tests.unit.test_engine_core import page, request

# Triton's interpreter turns 1-element arrays into loop bounds with int(), which numpy >= 1.25 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _engine(tiny_full, monkeypatch, backend: str, static: bool = False, **config) -> Engine:
    monkeypatch.setattr(engine_module, "ModelRunner", functools.partial(ModelRunner, static_decode=static))
    config = EngineConfig(**({"max_num_seqs": 4, "max_num_batched_tokens": 48, "num_kv_blocks": 48,
                              "enable_prefix_caching": True, "attention_backend": backend} | config))  # fmt: skip
    return Engine.from_pretrained(tiny_full, dtype="float32", config=config)


def _answers(engine: Engine, requests) -> list[tuple[list[int], list[float]]]:
    handles = [engine.submit(r) for r in requests]
    out = []
    for handle in handles:
        choice = handle.result().choices[0]
        assert choice.error is None, choice.error
        out.append((choice.token_ids, [entry.logprob for entry in choice.logprobs]))
    return out


def _requests():
    """Decoding rows beside prefill chunks (48-token budget: the long prompt takes several chunks, the later
    ones after a cached prefix), an image, and a repeated prompt read from the prefix cache."""
    return [request("Count to ten.", max_tokens=6, logprobs=True),
            request("A " * 70 + "longer prompt.", max_tokens=5, logprobs=True),
            request("Read the page.", [page(3, (200, 150))], max_slice_nums=1, max_tokens=4, logprobs=True),
            request("Count to ten.", max_tokens=6, logprobs=True)]  # fmt: skip


def test_the_paged_kernel_gives_the_reference_engines_ids_and_logprobs(tiny_full, monkeypatch):
    reference = _engine(tiny_full, monkeypatch, "reference")
    paged = _engine(tiny_full, monkeypatch, "triton")
    try:
        assert isinstance(paged.runner.attention, TritonAttention) and "interpreter" in paged.runner.attention.selection
        expected, got = _answers(reference, _requests()), _answers(paged, _requests())
        for (ids_r, lp_r), (ids_p, lp_p) in zip(expected, got, strict=True):
            assert ids_p == ids_r
            torch.testing.assert_close(torch.tensor(lp_p), torch.tensor(lp_r), rtol=0, atol=1e-4)
        # the cached-prefix path ran: a chunk read its sequence's earlier blocks (the repeated prompt's hit)
        assert paged.block_manager.prefix_hits > 0
    finally:
        reference.shutdown()
        paged.shutdown()


def test_static_decode_on_the_paged_kernel_has_one_width_and_gives_the_eager_ids(tiny_full, monkeypatch):
    eager = _engine(tiny_full, monkeypatch, "reference")
    static = _engine(tiny_full, monkeypatch, "triton", static=True, cuda_graph_max_len=64)
    try:
        graphs = static.runner.decode_graphs
        # One width: every context up to the model's length, whatever cuda_graph_max_len says (it bounds gathers).
        assert graphs.paged is static.runner.attention and len(graphs.widths) == 1
        assert graphs.max_context >= static.max_model_len
        reqs = [request("Count to ten.", max_tokens=5, logprobs=True),
                request("A " * 70 + "longer prompt.", max_tokens=4, logprobs=True)]  # fmt: skip
        expected, got = _answers(eager, reqs), _answers(static, reqs)
        for (ids_e, lp_e), (ids_s, lp_s) in zip(expected, got, strict=True):
            assert ids_s == ids_e
            torch.testing.assert_close(torch.tensor(lp_s), torch.tensor(lp_e), rtol=0, atol=1e-4)
        assert graphs.num_steps >= 3 and graphs.num_replays == 0  # the static forward ran, uncaptured (CPU)
    finally:
        eager.shutdown()
        static.shutdown()


def test_an_fp8_kv_cache_holds_twice_the_tokens_and_needs_the_kernel(tiny_full, monkeypatch):
    from minicpmv.engine.kv_pool import FP8

    budget = {"num_kv_blocks": None, "kv_cache_memory_mb": 4}
    plain = _engine(tiny_full, monkeypatch, "triton", **budget)
    fp8 = _engine(tiny_full, monkeypatch, "triton", kv_cache_dtype="fp8", **budget)
    try:
        assert fp8.runner.pool.keys[0].dtype == FP8 and plain.runner.pool.keys[0].dtype == torch.float32
        assert fp8.runner.pool.num_blocks == 4 * plain.runner.pool.num_blocks  # 1 byte a value instead of 4
        choice = fp8.generate(request("Count to ten.", max_tokens=5, logprobs=True)).choices[0]
        assert choice.error is None and len(choice.token_ids) == 5
        assert all(math.isfinite(entry.logprob) for entry in choice.logprobs)
        # Stored clamped to e4m3's range, not NaN.
        slots = torch.tensor([0])
        fp8.runner.pool.store(0, slots, torch.full((1, 2, 64), 1e4), torch.full((1, 2, 64), -1e4))
        assert fp8.runner.pool.keys[0][0].float().eq(448).all() and fp8.runner.pool.values[0][0].float().eq(-448).all()
    finally:
        plain.shutdown()
        fp8.shutdown()
    with pytest.raises(ValueError, match="read by the Triton paged kernel only"):
        _engine(tiny_full, monkeypatch, "reference", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
