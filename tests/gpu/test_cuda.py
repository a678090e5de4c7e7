"""CUDA paths (bf16 and bitsandbytes 4-bit on the GPU). CI has no GPU: these skip there, and run where one is."""

from __future__ import annotations

import pytest
import torch

from minicpmv.engine.engine import Engine
from minicpmv.engine.request import GenerationRequest
from minicpmv.engine.sampling import SamplingParams
from minicpmv.loading import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("checkpoint", ["tiny_full", "tiny_int4"])
def test_cuda_logits_follow_the_cpu_float32_model(request, checkpoint):
    path = request.getfixturevalue(checkpoint)
    cpu = load_model(path, device="cpu", dtype="float32")
    gpu = load_model(path, device="cuda", dtype="auto")
    assert gpu.dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.no_grad():
        reference = cpu(ids, attention_mask=mask).logits[:, -1]
        ours = gpu(ids.cuda(), attention_mask=mask.cuda()).logits[:, -1].float().cpu()
    relative = (ours - reference).norm() / reference.norm()
    assert relative < 0.05, relative  # bf16 activations (and bf16 4-bit compute) against float32


def test_engine_generates_on_cuda(tiny_int4):
    engine = Engine.from_pretrained(tiny_int4, device="cuda")
    try:
        result = engine.generate(GenerationRequest(
            "gpu", messages=[{"role": "user", "content": "Hello"}],
            sampling=SamplingParams(temperature=0.7, seed=1, max_tokens=16, ignore_eos=True, n=2)))  # fmt: skip
        assert result.completion_tokens == 32
    finally:
        engine.shutdown()
