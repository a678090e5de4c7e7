"""The CUDA path's desk-check findings (issue 22), proven where the CPU can show them: the collector paused during
capture and no reference cycle keeping a dropped engine alive; varlen fed K/V with their own heads when this
torch takes them; a prefill chunk after cached tokens called so that CUDA's fused kernels can take it, with
bounded score memory; a relative self-test bound for bf16; one host->device copy per step, with no
data-dependent shapes; start-up work with the instance's GPU current."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minicpmv.engine import attention, model_runner, staging
from minicpmv.engine import engine as engine_module
from minicpmv.engine.attention import (
    AttentionMetadata,
    ReferenceAttention,
    chunk_attention,
    mismatch,
    prefill_plan,
    select_backend,
)
from minicpmv.engine.cuda_graphs import DecodeGraphs, collector_paused
from minicpmv.engine.engine import Engine, EngineConfig
from tests.unit.test_engine_core import page, request

CPU = torch.device("cpu")


@pytest.fixture
def gc_state():
    """Restores the collector's state, whatever a test did to it."""
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


class FakeCudaDevice:
    """Stands in for ``torch.cuda.device``: records which device each block made current."""

    current: list[torch.device] = []
    entered: list[torch.device] = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        FakeCudaDevice.current.append(self.device)
        FakeCudaDevice.entered.append(self.device)

    def __exit__(self, *exc):
        FakeCudaDevice.current.pop()


@pytest.fixture
def fake_cuda_device(monkeypatch):
    FakeCudaDevice.current, FakeCudaDevice.entered = [], []
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    return FakeCudaDevice


def _current():
    return FakeCudaDevice.current[-1] if FakeCudaDevice.current else None


# ---------------------------------------------------------------- 1. capture and reference cycles


def test_the_collector_is_paused_inside_and_restored_after(gc_state, monkeypatch):
    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    gc.enable()
    with collector_paused():
        assert not gc.isenabled() and collected == [1]
        with collector_paused():  # nested (another capture): no collection while the first is open
            assert not gc.isenabled()
        assert not gc.isenabled() and collected == [1]  # the inner block does not switch it back on
    assert gc.isenabled()
    gc.disable()
    with pytest.raises(RuntimeError), collector_paused():  # off before: stays off, also after an error
        raise RuntimeError("capture failed")
    assert not gc.isenabled()


def _graphs(capture: bool = False, **kwargs) -> DecodeGraphs:
    settings = {"block_size": 16, "scratch_block": 4, "max_num_seqs": 2, "max_context": 64, "device": CPU}
    return DecodeGraphs(lambda ids, positions, meta: None, capture=capture, **(settings | kwargs))


def test_capture_runs_with_the_collector_off_and_the_instance_gpu_current(gc_state, monkeypatch, fake_cuda_device):
    seen = []
    monkeypatch.setattr(DecodeGraphs, "_capture_on_device", lambda self: seen.append((gc.isenabled(), _current())))
    gc.enable()
    _graphs(capture=True)  # the CPU has no capture: the same capture routine, recorded
    assert seen == [(False, None)] and gc.isenabled()
    graphs = _graphs()
    graphs.device = torch.device("cuda", 1)  # an instance on GPU 1
    graphs._capture_all()
    assert seen[-1] == (False, torch.device("cuda", 1)) and gc.isenabled()


def test_a_failed_capture_switches_the_collector_back_on(gc_state, monkeypatch):
    def fail(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture_on_device", fail)
    gc.enable()
    graphs = _graphs(capture=True)  # logged, and these steps run eagerly
    assert graphs.graphs == {} and gc.isenabled()


def test_graphs_do_not_keep_their_runner_alive():
    class Runner:
        def forward(self, ids, positions, meta):
            return "logits"

    runner = Runner()
    graphs = DecodeGraphs(runner.forward, block_size=16, scratch_block=4, max_num_seqs=2, max_context=64, device=CPU,
                          capture=False)  # fmt: skip
    assert graphs._static_forward(1, 16) == "logits"
    ref = weakref.ref(runner)
    del runner
    assert ref() is None
    with pytest.raises(RuntimeError, match="gone"):
        graphs._static_forward(1, 16)


def test_a_dropped_engine_is_freed_without_the_cycle_collector(tiny_full, monkeypatch, gc_state):
    # Static decode on: the runner holds DecodeGraphs, as on CUDA (where they would be captured).
    monkeypatch.setattr(engine_module, "ModelRunner", functools.partial(model_runner.ModelRunner, static_decode=True))
    config = EngineConfig(num_kv_blocks=24, max_num_seqs=2, max_num_batched_tokens=64, cuda_graph_max_len=256)
    engine = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    try:
        result = engine.generate(request("Count to ten.", max_tokens=6, stop=["zzzz"]))
        assert result.choices[0].error is None
        assert engine.runner.decode_graphs.num_steps > 0
    finally:
        engine.shutdown()
    assert not engine._thread.is_alive() and not engine.output._thread.is_alive()
    refs = {name: weakref.ref(obj) for name, obj in
            [("engine", engine), ("runner", engine.runner), ("model", engine.model), ("pool", engine.runner.pool),
             ("graphs", engine.runner.decode_graphs), ("output", engine.output)]}  # fmt: skip
    gc.collect()  # whatever else is pending; from here on, no collection
    gc.disable()
    del engine, result  # freed now only if no reference cycle holds them (a cycle waits for a collection)
    assert {name: ref() is None for name, ref in refs.items()} == dict.fromkeys(refs, True)


# ---------------------------------------------------------------- 2. varlen K/V heads


def _fake_varlen(mode: str, calls: list, with_enable_gqa: bool = False):
    """A CPU stand-in for torch's varlen_attn (causal = bottom-right, as FlashAttention aligns it). ``mode`` for
    fewer KV heads than query heads: "native" (FlashAttention-2: head h reads KV head h // group), "raise", or
    "wrong" (head h reads KV head h % Hk)."""

    def run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa):
        calls.append(key.shape[1])
        heads, kv_heads = query.shape[1], key.shape[1]
        if kv_heads != heads:
            if mode == "raise" or (with_enable_gqa and not enable_gqa):
                raise RuntimeError("query and key/value heads differ")
            group = heads // kv_heads
            if mode == "native":
                key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
            else:
                key, value = key.repeat(1, group, 1), value.repeat(1, group, 1)
        out = torch.empty_like(query)
        cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
        for b in range(len(cq) - 1):
            q = query[cq[b] : cq[b + 1]].transpose(0, 1)
            k, v = key[ck[b] : ck[b + 1]].transpose(0, 1), value[ck[b] : ck[b + 1]].transpose(0, 1)
            rows = torch.arange(q.shape[1])[:, None] + (k.shape[1] - q.shape[1])
            mask = torch.arange(k.shape[1])[None, :] <= rows if window_size == (-1, 0) else None
            out[cq[b] : cq[b + 1]] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
        return out

    if with_enable_gqa:  # torch 2.13's signature

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None):  # fmt: skip
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa)
    else:  # torch 2.11's: no enable_gqa

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), seqused_k=None):  # fmt: skip
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, False)

    return varlen_attn


@pytest.mark.parametrize(
    ("mode", "with_enable_gqa", "kv_heads", "kernel_heads"),
    [("native", False, "own heads", 4), ("raise", False, "repeated", 28), ("wrong", False, "repeated", 28),
     ("native", True, "enable_gqa", 4)],
)  # fmt: skip
def test_varlen_takes_kv_with_their_own_heads_where_the_self_test_passes(monkeypatch, caplog, mode, with_enable_gqa,
                                                                          kv_heads, kernel_heads):  # fmt: skip
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen(mode, calls, with_enable_gqa))
    with caplog.at_level(logging.INFO, logger="minicpmv.engine.attention"):
        backend = select_backend("varlen", CPU, torch.float32)  # self-tested on the CPU with the stand-in
    assert backend.name == "varlen" and backend.kv_heads == kv_heads
    assert calls[-1] == kernel_heads  # what the self-test's accepted call handed the kernel
    calls.clear()
    meta = AttentionMetadata.build([1, 3], [6, 5], [[7, 2], [4, 9]], block_size=4, device=CPU)
    keys, values = torch.randn(64, 4, 8), torch.randn(64, 4, 8)
    q = torch.randn(4, 28, 8)
    out = backend(q, keys[meta.slot_mapping], values[meta.slot_mapping], keys, values, meta)
    expected = ReferenceAttention()(q, keys[meta.slot_mapping], values[meta.slot_mapping], keys, values, meta)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert calls == [kernel_heads]
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", f"attention: varlen (asked for; varlen (K/V: {kv_heads}) passed the self-test)") in messages
    if kv_heads == "repeated":
        assert any(level == "WARNING" and "trying K/V repeated" in text for level, text in messages)
    assert backend.selection.startswith("asked for")


def test_auto_records_why_it_chose_and_falls_back_loudly(monkeypatch, caplog):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen("native", []))
    monkeypatch.setattr(attention, "_time_step", lambda backend, device, dtype: {"varlen": 1.0, "reference": 2.0}[
        backend.name])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="minicpmv.engine.attention"):
        chosen = attention._select_varlen_or_fastest("auto", CPU, torch.float32)
    assert chosen.name == "varlen" and "the faster" in chosen.selection and "own heads" in chosen.selection
    assert any(r.levelname == "INFO" and "attention: varlen" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(attention, "_self_test", lambda backend, device, dtype: "self-test: differs")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minicpmv.engine.attention"):
        chosen = attention._select_varlen_or_fastest("auto", CPU, torch.float32)
    assert chosen.name == "reference" and "not usable" in chosen.selection
    assert any(r.levelname == "WARNING" and "reference SDPA path" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 3. a prefill chunk after cached tokens


def _sdpa_calls(monkeypatch) -> list[dict]:
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append({"mask": attn_mask is not None, "gqa": enable_gqa and key.shape[-3] != query.shape[-3],
                      "scores": query.shape[-3] * query.shape[-2] * key.shape[-2] * 4})  # fmt: skip
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def _old_chunk(q, keys, values):
    """Today's call before the change: the whole chunk, a boolean mask and enable_gqa."""
    length, context = q.shape[0], keys.shape[0]
    rows = torch.arange(length)[:, None] + (context - length)
    mask = torch.arange(context)[None, :] <= rows
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)  # fmt: skip
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_a_chunk_after_cached_tokens_avoids_mask_with_gqa_on_cuda_and_bounds_scores(monkeypatch, device_type):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(37, 28, 16, generator=generator)
    keys, values = torch.randn(100, 4, 16, generator=generator), torch.randn(100, 4, 16, generator=generator)
    expected = _old_chunk(q, keys, values)
    budget = 28 * 100 * 4 * 10  # ten query rows' scores
    plan = prefill_plan(device_type, 28, 37, 100, budget_bytes=budget)
    assert plan.repeat_kv == (device_type == "cuda") and plan.rows == 10
    calls = _sdpa_calls(monkeypatch)
    got = chunk_attention(q, keys, values, plan)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert len(calls) == 4 and all(c["mask"] and c["scores"] <= budget for c in calls)
    # CUDA: flash takes no mask and memory-efficient no GQA, so mask + GQA would be the math kernel
    assert all(not c["gqa"] for c in calls) if device_type == "cuda" else all(c["gqa"] for c in calls)


def test_the_score_bound_at_long_contexts_and_one_piece_at_usual_ones():
    plan = prefill_plan("cuda", 28, 2048, 30_000)
    assert plan.rows * 28 * 30_000 * 4 <= attention.SCORE_BUDGET_BYTES and plan.rows < 2048
    assert prefill_plan("cuda", 28, 512, 8192).rows == 512


def test_the_reference_path_gives_todays_outputs_for_chunks_after_cached_tokens():
    generator = torch.Generator().manual_seed(2)
    keys, values = torch.randn(40 * 4, 4, 8, generator=generator), torch.randn(40 * 4, 4, 8, generator=generator)
    query_lens, context_lens, tables = [1, 6, 3, 5], [9, 20, 3, 13], [[5, 1, 12], [3, 7, 8, 9, 10], [0], [2, 4, 6, 11]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, 4, CPU)
    q = torch.randn(sum(query_lens), 28, 8, generator=generator)
    out = ReferenceAttention()(q, keys[meta.slot_mapping], values[meta.slot_mapping], keys, values, meta)
    for b, start, length, ctx in meta.prefills:
        if ctx != length:
            slots = meta.context_slots(b)
            torch.testing.assert_close(out[start : start + length], _old_chunk(q[start : start + length], keys[slots],
                                       values[slots]), rtol=1e-6, atol=1e-6)  # fmt: skip


# ---------------------------------------------------------------- 4. the self-test's bound


def _ulps(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` (bf16, positive) moved ``n`` representable values up."""
    return (x.view(torch.int16) + n).view(torch.bfloat16)


def test_the_self_test_bound_takes_two_bf16_ulps_at_any_magnitude():
    expected = torch.tensor([2.0, 2.5, 3.96875, 5.0, 100.0, 0.3], dtype=torch.bfloat16)
    got = _ulps(expected, 2)
    assert float((got.float() - expected.float()).abs().max()) > 2e-2  # the old absolute bound rejected this
    assert mismatch(got, expected) is None
    assert mismatch(-got, -expected) is None
    assert mismatch(expected + torch.tensor(8e-3, dtype=torch.bfloat16), expected) is None  # near zero: atol


def test_the_self_test_bound_still_catches_wrong_kernels():
    expected = torch.tensor([0.5, -0.25, 3.0], dtype=torch.bfloat16)
    assert "differs" in mismatch(expected + torch.tensor([0.0, 0.03, 0.0], dtype=torch.bfloat16), expected)
    assert "differs" in mismatch(_ulps(expected, 6), expected)  # six ulps at 3.0: 0.094 > 0.01 + 0.048
    assert mismatch(torch.tensor([float("nan"), 0, 3]), expected) == "non-finite values"
    assert "shape" in mismatch(expected[:2], expected)


# ---------------------------------------------------------------- 5. one host->device copy per step


def _old_build(query_lens, context_lens, block_tables, block_size):
    """The metadata as the code before the change computed it (Python lists, a boolean mask for varlen)."""
    widths = [-(-ctx // block_size) for ctx in context_lens]
    width = max(widths)
    table = torch.tensor([t[:w] + [0] * (width - w) for t, w in zip(block_tables, widths, strict=True)])
    slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(len(table), -1)
    seq_index, positions, starts, decode, total = [], [], [], [], 0
    for b, (q, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        seq_index += [b] * q
        positions += range(ctx - q, ctx)
        starts.append(total)
        total += q
        if q == 1:
            decode.append(b)
    old = {"slots": slots, "slot_mapping": slots[torch.tensor(seq_index), torch.tensor(positions)],
           "positions": torch.tensor(positions),
           "prefills": [(b, starts[b], q, context_lens[b]) for b, q in enumerate(query_lens) if q != 1]}  # fmt: skip
    if decode:
        width_decode = max(widths[b] for b in decode) * block_size
        old["decode_rows"] = torch.tensor([starts[b] for b in decode])
        old["decode_slots"] = slots[:, :width_decode].index_select(0, torch.tensor(decode))
        lengths = torch.tensor([context_lens[b] for b in decode])
        old["decode_mask"] = (torch.arange(width_decode)[None, :] < lengths[:, None])[:, None, None, :]
    lengths = torch.tensor(context_lens)
    packed = slots[torch.arange(slots.shape[1])[None, :] < lengths[:, None]]
    old["varlen"] = (packed, torch.tensor([0, *query_lens]).cumsum(0, dtype=torch.int32),
                     torch.tensor([0, *context_lens]).cumsum(0, dtype=torch.int32), max(query_lens), max(context_lens))
    return old


@pytest.mark.parametrize("seed", range(6))
def test_the_metadata_equals_what_the_old_code_computed(seed):
    rng = np.random.default_rng(seed)
    batch, block_size = int(rng.integers(1, 9)), int(rng.choice([1, 4, 16]))
    query_lens, context_lens, tables = [], [], []
    for _ in range(batch):
        ctx = int(rng.integers(1, 90))
        q = 1 if rng.random() < 0.5 else int(rng.integers(1, ctx + 1))
        blocks = -(-ctx // block_size)
        tables.append([int(b) for b in rng.permutation(400)[: blocks + int(rng.integers(0, 3))]])
        query_lens.append(q)
        context_lens.append(ctx)
    old = _old_build(query_lens, context_lens, tables, block_size)
    new = AttentionMetadata.build(query_lens, context_lens, tables, block_size, CPU)
    for name in ("slots", "slot_mapping", "positions"):
        assert torch.equal(getattr(new, name), old[name]), name
    assert new.prefills == old["prefills"]
    for name in ("decode_rows", "decode_slots", "decode_mask"):
        assert (getattr(new, name) is None) == (name not in old)
        if name in old:
            assert torch.equal(getattr(new, name), old[name]), name
    for got, expected in zip(new.varlen_inputs(), old["varlen"], strict=True):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))


def test_upload_is_one_buffer_of_views():
    parts = staging.upload([np.arange(3), np.arange(6).reshape(2, 3) + 10, np.array([], dtype=np.int64)], CPU)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [[10, 11, 12], [13, 14, 15]], []]
    assert parts[0].untyped_storage().data_ptr() == parts[1].untyped_storage().data_ptr()
    table = staging.padded_table([[5, 6, 7], [8], ()], np.array([2, 1, 0]), 3, fill=-1)
    assert table.tolist() == [[5, 6, -1], [8, -1, -1], [-1, -1, -1]]


def test_the_static_step_loads_ids_positions_and_tables_in_one_copy(monkeypatch):
    graphs = _graphs(max_num_seqs=4)
    uploads = []
    upload = staging.upload
    monkeypatch.setattr(staging, "upload", lambda arrays, device: uploads.append(1) or upload(arrays, device))
    graphs._load([11, 12, 13], [17, 3, 40], [[7, 8, 9], [2], [1, 0, 6]], batch=4, width=4)
    assert uploads == [1]
    assert graphs.ids[:4].tolist() == [11, 12, 13, 0] and graphs.positions[:4].tolist() == [17, 3, 40, 0]
    assert graphs.tables[:4, :4].tolist() == [[7, 8, 4, 4], [2, 4, 4, 4], [1, 0, 6, 4], [4, 4, 4, 4]]


@pytest.mark.parametrize("static", [False, True])
def test_every_step_makes_one_host_to_device_copy(tiny_full, monkeypatch, static):
    monkeypatch.setattr(engine_module, "ModelRunner", functools.partial(model_runner.ModelRunner, static_decode=static))
    config = EngineConfig(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, cuda_graph_max_len=128,
                          enable_prefix_caching=False)  # fmt: skip
    engine = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    uploads, device_tensors, inside = [], [], []  # inside: the engine thread's id while it runs a step
    upload, tensor, execute = staging.upload, torch.tensor, engine.runner.execute

    def counting_upload(arrays, device):
        uploads.append(len(arrays))
        return upload(arrays, device)

    def recording_tensor(*args, **kwargs):
        if threading.get_ident() in inside and kwargs.get("device") is not None:
            device_tensors.append(kwargs["device"])
        return tensor(*args, **kwargs)

    def traced_execute(batch):
        inside.append(threading.get_ident())
        try:
            return execute(batch)
        finally:
            inside.pop()

    monkeypatch.setattr(staging, "upload", counting_upload)
    monkeypatch.setattr(torch, "tensor", recording_tensor)
    engine.runner.execute = traced_execute
    try:
        reqs = [request("Count to ten.", max_tokens=8), request("Read the page.", [page(3)], max_tokens=6),
                request("A " * 40 + "longer prompt.", max_tokens=8)]  # fmt: skip
        handles = [engine.submit(r) for r in reqs]
        assert all(h.result().choices[0].error is None for h in handles)
        assert len(uploads) == engine.num_steps > 0 and device_tensors == []
        if static:
            assert engine.runner.decode_graphs.num_steps > 0
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- 6. the instance's GPU current at start-up


def test_the_device_scope_makes_the_instance_gpu_current(fake_cuda_device):
    with staging.device_scope(torch.device("cuda", 2)):
        assert _current() == torch.device("cuda", 2)
    with staging.device_scope(CPU):
        assert _current() is None
    assert fake_cuda_device.entered == [torch.device("cuda", 2)]


def test_backend_self_test_and_timing_run_with_the_instance_gpu_current(monkeypatch, fake_cuda_device):
    import torch.nn.attention.varlen as varlen

    seen = []
    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen("native", []))
    monkeypatch.setattr(attention, "_self_test", lambda backend, device, dtype: seen.append(("test", _current())))
    monkeypatch.setattr(attention, "_time_step", lambda backend, device, dtype: seen.append(("time", _current())) or 1)
    select_backend("auto", torch.device("cuda", 1), torch.bfloat16)
    gpu = torch.device("cuda", 1)
    assert seen == [("test", gpu), ("time", gpu), ("time", gpu)]


def test_the_runner_and_the_load_run_with_the_model_device_current(tiny_full, monkeypatch):
    from minicpmv import loading

    current, seen = [], []  # the scopes open now; (what ran, the scopes open then)

    @contextlib.contextmanager
    def recording_scope(device):
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(loading, "device_scope", recording_scope)
    load_state = loading._load_state
    monkeypatch.setattr(loading, "_load_state", lambda *a: seen.append(("load", list(current))) or load_state(*a))
    model = loading.load_model(tiny_full, dtype="float32")
    assert seen == [("load", [CPU])]

    monkeypatch.setattr(model_runner, "device_scope", recording_scope)
    select = model_runner.select_backend
    monkeypatch.setattr(model_runner, "select_backend", lambda *a: seen.append(("select", list(current))) or select(*a))
    runner = model_runner.ModelRunner(model, num_kv_blocks=8, static_decode=True)
    assert seen[-1] == ("select", [CPU]) and runner.pool.keys[0].device == CPU
