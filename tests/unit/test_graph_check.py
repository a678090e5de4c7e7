"""device_checks.check_graphs_against_eager, the GPU check's comparison of CUDA-graph decode steps with eager ones,
run on the CPU against the graphs' static-shape forward (uncaptured there: the same arithmetic the graphs replay)."""

from __future__ import annotations

import functools

import pytest

from minicpmv.devtools.device_checks import CheckFailed, check_graphs_against_eager
from minicpmv.engine import engine as engine_module
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.model_runner import ModelRunner


@pytest.fixture
def static_engine(tiny_full, monkeypatch):
    monkeypatch.setattr(engine_module, "ModelRunner", functools.partial(ModelRunner, static_decode=True))
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=128, num_kv_blocks=128, cuda_graph_max_len=512)
    engine = Engine.from_pretrained(tiny_full, dtype="float32", config=config)
    yield engine
    engine.shutdown()


def test_static_decode_steps_match_eager_ones_and_the_engine_is_restored(static_engine):
    runner = static_engine.runner
    result = check_graphs_against_eager(static_engine, steps=6, words=(4, 40, 160))
    assert result["steps_compared"] >= 4 and result["rows"] >= 10
    assert result["max_rel_l2"] < 1e-4 and result["steps_with_other_ids"] == 0
    assert result["replayed"] == 0  # the CPU: static forward, never a captured graph
    assert "execute" not in vars(runner) and runner.decode_graphs is not None


def test_graph_logits_off_the_eager_ones_fail_the_check(static_engine):
    runner = static_engine.runner
    execute = runner.execute

    def off_when_static(batch, *args, **kwargs):  # what a graph with a wrong input would do: other logits
        logits = execute(batch, *args, **kwargs)
        return logits if runner.decode_graphs is None else logits * 1.3

    runner.execute = off_when_static
    with pytest.raises(CheckFailed, match="relative L2"):
        check_graphs_against_eager(static_engine, steps=4, words=(4, 40))


def test_an_engine_without_graphs_is_refused(tiny_full):
    engine = Engine.from_pretrained(tiny_full, dtype="float32", config=EngineConfig(num_kv_blocks=64))
    try:
        with pytest.raises(CheckFailed, match="no decode graphs"):
            check_graphs_against_eager(engine)
    finally:
        engine.shutdown()


def test_host_syncs_are_counted_from_the_engine_thread(monkeypatch):
    """speed.count_host_syncs (the GPU check's host-wait count) records torch's sync-debug warnings raised on
    another thread, as the engine's are, per step; here torch's switch and the decode run are stand-ins."""
    import threading
    import warnings
    from types import SimpleNamespace

    import torch

    from minicpmv.devtools import speed

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    engine = SimpleNamespace(runner=SimpleNamespace(device=torch.device("cuda")), num_steps=10)

    def decode(eng, concurrency, tokens):
        def step():
            for _ in range(4):
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
                eng.num_steps += 1
            warnings.warn("something else", UserWarning, stacklevel=1)

        thread = threading.Thread(target=step)
        thread.start()
        thread.join()

    monkeypatch.setattr(speed, "measure_decode", decode)
    result = speed.count_host_syncs(engine)
    assert result["steps"] == 4 and result["syncs"] == 4 and result["syncs_per_step"] == 1.0
    assert modes == ["warn", "default"]
