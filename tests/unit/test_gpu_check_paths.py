"""The GPU check's paged-kernel-vs-gather comparison (issue 23), on the CPU: ``speed.gather_path`` swaps an engine
built on the paged kernel (Triton's interpreter here) onto the gather path it replaced and back, the figures of
benchmarks/gpu_check.py's ``_kernel_vs_gather`` and the report's lines for them. The GPU timings themselves
(CUDA events, captured graphs) run only in the GPU check.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minicpmv.devtools import speed
from minicpmv.engine import attention
from minicpmv.engine import engine as engine_module
from minicpmv.engine.attention import ReferenceAttention
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.model_runner import ModelRunner
from minicpmv.engine.triton_attention import TritonAttention
from tests.unit.test_engine_core import request

# Triton's interpreter turns 1-element arrays into loop bounds with int(), which numpy >= 1.25 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # gpu_check imports its sibling gpu_check_report by name
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def kernel_engine(tiny_full):
    """The tiny model on the paged kernel with its decode graphs (one width; uncaptured on the CPU)."""
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=64, attention_backend="triton")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "ModelRunner", functools.partial(ModelRunner, static_decode=True))
        engine = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    yield engine
    engine.shutdown()


def _greedy(engine: Engine, tokens: int = 4) -> list[list[int]]:
    prompts = ("Count to ten.", "Name three colours of the sea at dawn.")
    handles = [engine.submit(request(p, max_tokens=tokens)) for p in prompts]
    return [h.result().choices[0].token_ids for h in handles]


def test_gather_path_decodes_the_kernels_ids_on_gather_graphs_and_restores_the_runner(kernel_engine):
    runner = kernel_engine.runner
    kernel, tiling, graphs = runner.attention, runner._tiling, runner.decode_graphs
    assert isinstance(kernel, TritonAttention) and graphs.paged is kernel and len(graphs.widths) == 1
    expected = _greedy(kernel_engine)
    kernel_steps = graphs.num_steps
    assert kernel_steps >= 3  # the kernel's static decode ran

    with speed.gather_path(kernel_engine, max_context=2048) as figures:
        gather = runner.decode_graphs
        assert isinstance(runner.attention, ReferenceAttention) and runner._tiling is None
        assert gather is not graphs and gather.paged is None
        assert [w * gather.block_size for w in gather.widths] == [256, 512, 1024, 2048]
        assert figures["attention"] == "reference" and figures["cuda_graphs"]["captured"] == 0  # CPU: uncaptured
        assert figures["cuda_graphs"]["attention_path"] == "gather"
        assert figures["cuda_graphs"]["context_buckets_tokens"] == [256, 512, 1024, 2048]
        got = _greedy(kernel_engine)
        assert gather.num_steps >= 3 and gather.num_replays == 0  # decode went through the gather static forward
    assert got == expected
    assert runner.attention is kernel and runner._tiling is tiling and runner.decode_graphs is graphs
    assert graphs.num_steps == kernel_steps  # nothing decoded on the kernel's graphs meanwhile


def test_an_exception_inside_gather_path_still_restores_the_runner(kernel_engine):
    runner = kernel_engine.runner
    saved = runner.attention, runner._tiling, runner.decode_graphs
    with pytest.raises(RuntimeError, match="inside"), speed.gather_path(kernel_engine):
        assert runner._tiling is None
        raise RuntimeError("inside")
    assert (runner.attention, runner._tiling, runner.decode_graphs) == saved


def test_a_failure_while_entering_leaves_nothing_swapped(kernel_engine, monkeypatch):
    runner = kernel_engine.runner
    saved = runner.attention, runner._tiling, runner.decode_graphs
    from minicpmv.engine import cuda_graphs

    def broken(*args, **kwargs):
        raise MemoryError("no room for the gather graphs")

    monkeypatch.setattr(cuda_graphs, "DecodeGraphs", broken)
    with pytest.raises(MemoryError), speed.gather_path(kernel_engine):
        pytest.fail("the block must not run")
    assert (runner.attention, runner._tiling, runner.decode_graphs) == saved
    with pytest.raises(ValueError, match="no gather backend"), speed.gather_path(kernel_engine, backend="triton"):
        pass
    assert (runner.attention, runner._tiling, runner.decode_graphs) == saved


def test_the_stage_records_gather_figures_and_the_comparison(kernel_engine, tmp_path):
    gpu_check = _script("gpu_check")
    rec = gpu_check.Recorder(tmp_path / "stage_full_bf16.json")
    args = SimpleNamespace(concurrency=[1, 2], output_tokens=3)
    for level in args.concurrency:
        rec.step(f"decode_c{level}", lambda level=level: speed.measure_decode(kernel_engine, level, 3, 1e12))
    kernel = kernel_engine.runner.attention
    gpu_check._kernel_vs_gather(rec, kernel_engine, args, 1e12)
    results = rec.data["results"]
    assert rec.data["failed"] == [] and kernel_engine.runner.attention is kernel
    assert results["decode_c1"]["attention_path"] == "paged kernel"
    assert results["decode_c2_gather"]["attention_path"] == "gather"
    assert results["gather_path"]["passed"] and results["gather_path"]["cuda_graphs"]["captured"] == 0
    assert results["attention_step_c64_ctx2048"].startswith("skipped")  # CUDA events: the GPU only
    table = results["decode_kernel_vs_gather"]
    assert set(table) == {"c1", "c2"} and table["c2"]["kernel_over_gather"] > 0
    assert table["c1"]["kernel_percent_of_bound"] == results["decode_c1"]["percent_of_bound"]
    targets = gpu_check._targets(results)
    assert targets["c1_percent_of_bound"] == results["decode_c1"]["percent_of_bound"]
    assert targets["c64_decode_tok_s"] is None and targets["c64_met"] is None  # not measured here
    assert json.loads((tmp_path / "stage_full_bf16.json").read_text())["results"].keys() == results.keys()


def test_attention_step_reports_both_backends_and_the_kernels_share_of_bandwidth(monkeypatch):
    timed = {}

    def fake_time_step(backend, device, dtype, repeats, *, query_lens, context_lens, shape):
        timed[backend.name] = (len(query_lens), set(query_lens), set(context_lens), shape, repeats)
        return {"triton": 0.1, "varlen": 0.4, "reference": 0.8}[backend.name]

    monkeypatch.setattr(attention, "_time_step", fake_time_step)
    kernel, varlen = SimpleNamespace(name="triton"), SimpleNamespace(name="varlen")
    row = speed.attention_step(kernel, varlen, torch.device("cpu"), torch.bfloat16, (28, 4, 128), 3.35e12)
    assert timed["triton"] == (64, {1}, {2048}, (28, 4, 128), 20) and set(timed) == {"triton", "varlen", "reference"}
    assert row["kernel_kv_bytes"] == 64 * 2048 * 4 * 128 * 2 * 2  # K and V, bf16
    assert (row["kernel_ms"], row["gather_ms"], row["reference_gather_ms"]) == (0.1, 0.4, 0.8)
    assert row["gather_over_kernel"] == 4.0
    assert row["kernel_percent_of_hbm"] == pytest.approx(100 * row["kernel_kv_bytes"] / 1e-4 / 3.35e12, abs=0.05)


def test_the_report_shows_the_comparison_the_step_and_both_graphs():
    report = _script("gpu_check_report")
    graphs = {"attention_path": "paged kernel", "captured": 9, "capture_s": 3.1, "pool_mib": 120.0,
              "context_buckets_tokens": [32768]}  # fmt: skip
    gather = {"passed": True, "attention": "varlen", "attention_selection": "auto", "cuda_graphs": graphs | {
        "attention_path": "gather", "captured": 36, "capture_s": 9.5, "pool_mib": 700.0,
        "context_buckets_tokens": [256, 512, 1024, 2048]}}  # fmt: skip
    step = {"passed": True, "sequences": 64, "context_tokens": 2048, "gather_backend": "varlen", "kernel_ms": 0.05,
            "gather_ms": 0.3, "reference_gather_ms": 0.5, "gather_over_kernel": 6.0, "kernel_kv_bytes": 2**27,
            "kernel_percent_of_hbm": 80.1}  # fmt: skip
    row = {"passed": True, "concurrency": 1, "decode_tok_s": 200.0, "percent_of_bound": 65.0,
           "attention_path": "gather", "cuda_graphs": True}  # fmt: skip
    results = {"cuda_graphs": graphs, "gather_path": gather, "attention_step_c64_ctx2048": step,
               "decode_c1": row | {"attention_path": "paged kernel"}, "decode_c1_gather": row,
               "decode_kernel_vs_gather": {"c1": {"kernel_tok_s": 220.0, "kernel_percent_of_bound": 65.0,
                                                  "gather_tok_s": 200.0, "gather_percent_of_bound": 59.0,
                                                  "kernel_over_gather": 1.1}},
               "targets": {"c1_percent_of_bound": 65.0, "c1_target_percent": 60, "c1_met": True}}  # fmt: skip
    summary = {"date": "today", "command": "x", "mode": {}, "runtime_s": 1, "hardware": {"gpu": "H100",
               "gpu_memory_gib": 80}, "versions": {}, "stages": {"full_bf16": {"status": "ok", "results": results}}}  # fmt: skip
    text = report.render_markdown(summary)
    assert "| 1 | 220.0 | 65.0 | 200.0 | 59.0 | 1.1 |" in text
    assert "kernel 0.05 ms (80.1% of HBM bandwidth for 128 MiB of K/V), varlen gather 0.3 ms" in text
    assert "kernel graphs: 9 captured in 3.1 s, pool 120.0 MiB" in text
    assert "gather graphs: 36 captured in 9.5 s, pool 700.0 MiB, contexts [256, 512, 1024, 2048]" in text
    assert "| 1 | greedy | gather | yes | 200.0 |" in text and "targets: c1_percent_of_bound 65.0" in text
    json.dumps(summary)  # the figures are plain JSON


# ---------------------------------------------------------------- issue 28: the int4 paths side by side


def test_int4_path_switches_the_linears_with_their_own_graphs_and_puts_the_engines_back(tiny_int4):
    """On the CPU both sides are the kernel (bitsandbytes' CPU forward repacks the weights for good, so the GPU check
    compares the two paths on a GPU only); what is checked is the swap: new forwards and decode graphs inside, the
    engine's own objects (whose tensors its graphs captured) back after, the same greedy ids throughout."""
    from minicpmv.engine.nf4_linear import NF4Forward, llm_linear4bit

    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, num_kv_blocks=16, int4_kernel="triton",
                          attention_backend="reference")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "ModelRunner", functools.partial(ModelRunner, static_decode=True))
        engine = Engine.from_pretrained(tiny_int4, dtype="float32", config=config)
    try:
        own = {name: m.__dict__["forward"] for name, m in llm_linear4bit(engine.model)}
        graphs = engine.runner.decode_graphs
        before = _greedy(engine, tokens=3)
        with speed.int4_path(engine, "triton") as info:
            assert info["int4_selection"].startswith("triton NF4 kernel") and info["cuda_graphs"] is not None
            inside = {name: m.__dict__["forward"] for name, m in llm_linear4bit(engine.model)}
            assert all(isinstance(f, NF4Forward) and f is not own[n] for n, f in inside.items())
            assert engine.runner.decode_graphs is not graphs
            assert _greedy(engine, tokens=3) == before
        assert {name: m.__dict__["forward"] for name, m in llm_linear4bit(engine.model)} == own
        assert engine.runner.decode_graphs is graphs and _greedy(engine, tokens=3) == before
    finally:
        engine.shutdown()


def test_the_report_shows_the_int4_comparison():
    report = _script("gpu_check_report")
    lines = report._int4_kernel_vs_bitsandbytes({"int4_selection": "triton NF4 kernel", "decode_int4_kernel_vs_bitsandbytes": {
        "c64": {"kernel_tok_s": 3000.0, "kernel_percent_of_bound": 40.0, "bitsandbytes_tok_s": 1500.0,
                "bitsandbytes_percent_of_bound": 20.0, "kernel_over_bitsandbytes": 2.0}}})  # fmt: skip
    assert "| 64 | 3000.0 | 40.0 | 1500.0 | 20.0 | 2.0 |" in lines and "(served on: triton NF4 kernel)" in lines[1]
    assert report._int4_kernel_vs_bitsandbytes({}) == []
