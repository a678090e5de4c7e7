"""A real tritonserver serving model_repository/ (CPU configs) with the tiny checkpoints, once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpmv_triton.launcher import TritonServer

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = ("minicpm_v_2_6", "minicpm_v_2_6_int4")


@pytest.fixture(scope="session")
def server(tiny_full, tiny_int4):
    env = {
        "MINICPMV_CHECKPOINT_MINICPM_V_2_6": str(tiny_full),
        "MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4": str(tiny_int4),
        "MINICPMV_DTYPE": "float32",
        "OMP_NUM_THREADS": "2",
    }
    triton = TritonServer(REPOSITORY, models=list(MODELS), extra_env=env, extra_args=["--model-config-name=cpu"],
                          exit_timeout=10, address="127.0.0.1")  # fmt: skip
    triton.start()
    try:
        triton.wait_ready(timeout=300)
        yield triton
    finally:
        triton.stop()


