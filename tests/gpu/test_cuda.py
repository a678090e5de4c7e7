"""The CUDA paths: the golden reference in float32, bf16, nf4, the engine with images, JSON mode and seeds.

Each test runs one check of minicpmv/devtools/device_checks.py on "cuda" (benchmarks/gpu_check.py runs the
same functions). The checks compare with the CPU or with the original code's numbers and verify that the work
really ran on the GPU (parameters, KV cache and vision-tower inputs on CUDA), so a path that falls back to the
CPU fails. Without a GPU they skip; on a host that HAS an NVIDIA GPU but a CPU-only torch, they fail instead of
skipping silently.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from minicpmv.devtools import device_checks as checks
from tests.conftest import GOLDEN


def _host_has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "GPU" in listing


def test_torch_sees_the_gpu_this_host_has():
    if not _host_has_nvidia_gpu():
        pytest.skip("no NVIDIA GPU on this host")
    assert torch.cuda.is_available(), (
        f"nvidia-smi lists a GPU but torch {torch.__version__} has no CUDA: the CUDA tests would be skipped; "
        "install a CUDA build of torch (scripts/setup.sh does where nvidia-smi works)"
    )


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu]


@needs_cuda
def test_float32_reproduces_the_original_code_on_cuda(golden_checkpoint):
    result = checks.check_golden_float32(GOLDEN, golden_checkpoint, "cuda")
    assert result["max_abs_logit_diff"] <= checks.GOLDEN_ATOL


@needs_cuda
def test_bfloat16_stays_within_its_tolerance_on_cuda(golden_checkpoint):
    result = checks.check_golden_bfloat16(GOLDEN, golden_checkpoint, "cuda")
    assert max(result["relative_l2_by_case"].values()) <= checks.BF16_REL_TOL


@needs_cuda
def test_nf4_prequantized_and_quantized_on_load_on_cuda(tiny_full, tiny_int4):
    result = checks.check_nf4(tiny_full, tiny_int4, "cuda")
    assert len(result["generated_ids"]) == 8


@needs_cuda
def test_engine_on_cuda_alone_in_a_batch_and_against_the_cpu(tiny_full):
    result = checks.check_engine(tiny_full, "cuda")
    assert result["batch_parity"] and len(result["greedy_ids"]) == 16


@needs_cuda
def test_json_mode_and_seeds_on_cuda(tiny_full):
    result = checks.check_json_and_seeds(tiny_full, "cuda")
    assert set(result["json"]) == {"answer", "page"}


@needs_cuda
def test_cuda_graph_decode_steps_match_eager_ones_on_cuda(tiny_full):
    from minicpmv.engine.engine import Engine, EngineConfig

    engine = Engine.from_pretrained(tiny_full, device="cuda", dtype="bfloat16",
                                    config=EngineConfig(max_num_seqs=8, kv_cache_memory_mb=checks.CHECK_KV_MB))  # fmt: skip
    try:
        result = checks.check_graphs_against_eager(engine, words=(20, 400, 2600))
    finally:
        engine.shutdown()
    assert result["replayed"] >= result["steps_compared"] >= 4 and result["max_rel_l2"] <= checks.GRAPH_REL_TOL
