"""The engine on the fused NF4 kernel (kernels/nf4.py via nf4_linear.py), end to end on the CPU through Triton's
interpreter: ``int4_kernel="triton"`` on the tiny int4 checkpoint decodes the same greedy ids as bitsandbytes'
own forward; only the LLM's 4-bit linears are switched and their state dict is untouched; the "auto" selection
(self-test, fallback with a warning) and the setting's validation. Tiny model, a few steps: the interpreter is slow.
"""

from __future__ import annotations

import logging

import pytest
import torch

from minicpmv.engine import nf4_linear
from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.nf4_linear import NF4Forward, llm_linear4bit, select_int4_kernel
from minicpmv.offline import import_bitsandbytes
from tests.unit.test_engine_core import request

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _engine(tiny_int4, int4_kernel: str) -> Engine:
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, num_kv_blocks=16, int4_kernel=int4_kernel,
                          attention_backend="reference")  # fmt: skip
    return Engine.from_pretrained(tiny_int4, dtype="float32", config=config)


def test_the_triton_kernel_decodes_the_bitsandbytes_engines_greedy_ids(tiny_int4, monkeypatch):
    from minicpmv.engine.kernels import nf4

    rows_seen = []
    original = nf4.NF4Weight.matmul

    def counted(self, x, *args, **kwargs):
        rows_seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(nf4.NF4Weight, "matmul", counted)
    reference = _engine(tiny_int4, "bitsandbytes")
    fused = _engine(tiny_int4, "triton")
    try:
        assert reference.runner.int4_selection == "bitsandbytes (asked for)"
        assert fused.runner.int4_selection.startswith("triton NF4 kernel, under Triton's interpreter (asked for")
        bnb = import_bitsandbytes()
        switched = {
            name for name, m in fused.model.named_modules() if isinstance(m.__dict__.get("forward"), NF4Forward)
        }
        quantized = {name for name, m in fused.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert switched == {n for n in quantized if n.startswith("llm.")} and switched
        assert any(n.startswith("vpm.") for n in quantized - switched)  # the vision tower's stay with bitsandbytes
        # Two prompts decoding together (the GEMV kernel at 2 rows), a prefill of each (the tiled kernel).
        requests = [request("Count to ten.", max_tokens=4), request("Name a colour, then another.", max_tokens=4)]
        expected = [h.result().choices[0].token_ids for h in [reference.submit(r) for r in requests]]
        requests = [request("Count to ten.", max_tokens=4), request("Name a colour, then another.", max_tokens=4)]
        got = [h.result().choices[0].token_ids for h in [fused.submit(r) for r in requests]]
        assert got == expected and all(len(ids) == 4 for ids in got)
        # every LLM linear of every step ran the kernel: prefills (tiled, > 8 rows) and decodes of 2 rows (GEMV)
        assert len(rows_seen) % len(switched) == 0 and 2 in rows_seen and max(rows_seen) > nf4.GEMV_MAX_ROWS
    finally:
        reference.shutdown()
        fused.shutdown()


@pytest.fixture
def int4_model(tiny_int4):
    from minicpmv.loading import load_model

    return load_model(tiny_int4, dtype="float32")


def test_switching_keeps_the_state_dict_and_back(int4_model):
    before = {k: v.clone() for k, v in int4_model.state_dict().items()}
    layers = llm_linear4bit(int4_model)
    x = torch.randn(3, layers[0][1].in_features)
    assert select_int4_kernel(int4_model, "triton").startswith("triton NF4 kernel")
    assert all(isinstance(m.__dict__.get("forward"), NF4Forward) for _, m in layers)
    out = layers[0][1](x)  # the module's call goes through the kernel
    assert out.shape == (3, layers[0][1].out_features)
    after = int4_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert select_int4_kernel(int4_model, "bitsandbytes") == "bitsandbytes (asked for)"
    assert all("forward" not in m.__dict__ for _, m in layers)


def test_auto_on_the_cpu_is_bitsandbytes(int4_model):
    assert select_int4_kernel(int4_model, "auto") == "bitsandbytes (auto on cpu)"
    assert all("forward" not in m.__dict__ for _, m in llm_linear4bit(int4_model))


def test_auto_on_cuda_takes_the_kernel_if_its_self_test_passes(int4_model, monkeypatch, caplog):
    # The decision alone (this machine has no GPU): the self-test's verdict is planted, the layers stay on the CPU.
    monkeypatch.setattr(nf4_linear, "self_test", lambda module, dtype, device: None)
    chosen = select_int4_kernel(int4_model, "auto", device=torch.device("cuda"))
    assert "passed the self-test" in chosen
    assert all(isinstance(m.__dict__.get("forward"), NF4Forward) for _, m in llm_linear4bit(int4_model))
    monkeypatch.setattr(nf4_linear, "self_test", lambda module, dtype, device: "differs by 3")
    with caplog.at_level(logging.WARNING, logger="minicpmv.engine.nf4_linear"):
        chosen = select_int4_kernel(int4_model, "auto", device=torch.device("cuda"))
    assert chosen == "bitsandbytes: the Triton NF4 kernel is not usable here (differs by 3)"
    assert "not usable here" in caplog.text
    assert all("forward" not in m.__dict__ for _, m in llm_linear4bit(int4_model))


def test_the_self_test_passes_on_a_real_layer_and_catches_a_wrong_kernel(int4_model, monkeypatch):
    from minicpmv.engine.kernels import nf4

    module = dict(llm_linear4bit(int4_model))["model.layers.0.self_attn.q_proj"]
    assert module.bias is not None
    assert nf4_linear.self_test(module, torch.float32, torch.device("cpu"), rows=(1, 9)) is None
    original = nf4.NF4Weight.matmul
    monkeypatch.setattr(nf4.NF4Weight, "matmul", lambda self, x, bias=None: original(self, x, None))  # bias lost
    assert "differs" in nf4_linear.self_test(module, torch.float32, torch.device("cpu"), rows=(1,))


def test_a_layer_the_kernel_cannot_take(int4_model, monkeypatch):
    _, module = llm_linear4bit(int4_model)[-1]
    monkeypatch.setattr(module.weight.quant_state, "blocksize", 128)
    with pytest.raises(RuntimeError, match="'triton' is not usable here.*blocks of 64"):
        select_int4_kernel(int4_model, "triton")
    assert all("forward" not in m.__dict__ for _, m in llm_linear4bit(int4_model))  # none switched


def test_the_setting_is_validated(int4_model):
    with pytest.raises(ValueError, match="int4_kernel"):
        EngineConfig(int4_kernel="marlin")
    with pytest.raises(ValueError, match="unknown int4_kernel"):
        select_int4_kernel(int4_model, "marlin")
