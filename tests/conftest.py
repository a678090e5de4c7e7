"""Shared fixtures: the golden reference data and tiny checkpoints written by our own tooling."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv_triton.launcher import TritonServer

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"

torch.set_num_threads(2)
# The Batch API's state (SQLite and files) of every frontend the tests start, in-process or as a subprocess:
# a fresh folder, never the user's ~/.local/share.
os.environ.setdefault("MINICPMV_FRONTEND_BATCH_DATA_DIR", tempfile.mkdtemp(prefix="minicpmv-test-batches-"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def model_cases() -> dict:
    return json.loads((GOLDEN / "model_cases.json").read_text())


@pytest.fixture(scope="session")
def model_arrays():
    return np.load(GOLDEN / "model_cases.npz")


@pytest.fixture(scope="session")
def lut() -> np.ndarray:
    return np.load(GOLDEN / "processor_arrays.npz")["lut"]


@pytest.fixture(scope="session")
def golden_checkpoint(tmp_path_factory) -> Path:
    """The reference's tiny checkpoint, unpacked next to its config files."""
    from minicpmv.devtools.device_checks import unpack_golden_checkpoint

    return unpack_golden_checkpoint(GOLDEN, tmp_path_factory.mktemp("golden_tiny"))


@pytest.fixture(scope="session")
def tiny_full(tmp_path_factory) -> Path:
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_full"), seed=0)


@pytest.fixture(scope="session")
def tiny_int4(tmp_path_factory) -> Path:
    from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_int4"), int4=True, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny checkpoints' tokenizer (real special tokens at their real ids), loaded like a real one."""
    from minicpmv.devtools.tiny_tokenizer import write_tiny_tokenizer
    from minicpmv.tokenizer import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory)
    return load_tokenizer(directory)


# ---------------------------------------------------------------- the real stack (tests/triton, tests/frontend, ...)
REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
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


