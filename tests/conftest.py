"""Shared fixtures: the golden reference data and tiny checkpoints written by our own tooling."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv.engine import kv_pool
from minicpmv_triton.launcher import TritonServer

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"

torch.set_num_threads(2)
# The Batch API's state (SQLite and files) of every frontend the tests start, in-process or as a subprocess:
# a fresh folder, never the user's ~/.local/share.
os.environ.setdefault("MINICPMV_FRONTEND_BATCH_DATA_DIR", tempfile.mkdtemp(prefix="minicpmv-test-batches-"))

# ---------------------------------------------------------------- memory (scripts/run_tests.py checks the peak)
# The KV pool of an engine the tests build, in this process or in tritonserver: the CPU default is 1024 MB, all of
# it written at start-up; the tiny checkpoints take 2 KiB a token (float32), so 64 MB hold 32,768 tokens, their
# whole context. An EngineConfig with kv_cache_memory_mb or num_kv_blocks still gets exactly what it asks for.
TEST_KV_CACHE_MB = 64
kv_pool.DEFAULT_CPU_KV_MB = TEST_KV_CACHE_MB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_rss_after_collecting = [0]


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_after_each_module():
    """Engines and models the tests dropped may still sit in reference cycles (requests and their sequences, anything
    a failed test's traceback holds), which only a full collection frees, and the interpreter rarely runs one. One
    runs after each module once this process has grown by 256 MB since the last (it takes about half a second)."""
    yield
    if _rss_bytes() - _rss_after_collecting[0] > 256 << 20:
        gc.collect()
        _rss_after_collecting[0] = _rss_bytes()


# ---------------------------------------------------------------- the run's scope, for scripts/run_tests.py
# run_tests.py checks the peak memory only of a whole-suite run; it asks through this file whether this run was
# one. Taken out of the environment so that a pytest a test starts does not answer in this run's name.
_SCOPE_FILE = os.environ.pop("MINICPMV_SUITE_SCOPE_FILE", None)
_deselected = 0


def pytest_deselected(items) -> None:
    global _deselected
    _deselected += len(items)


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _SCOPE_FILE:
        return
    config = session.config
    narrowed = [name for name in ("lf", "stepwise", "ignore", "ignore_glob", "deselect") if config.getoption(name, None)]
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS and not _deselected and not narrowed
    Path(_SCOPE_FILE).write_text(json.dumps({"whole_suite": whole, "deselected": _deselected, "narrowed": narrowed}))


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


def serving_repository(directory: Path, models=MODELS, kv_cache_mb: int = TEST_KV_CACHE_MB) -> Path:
    """model_repository/ as the tests serve it: ``models`` as shipped, with configs/cpu.pbtxt's KV pool at
    ``kv_cache_mb`` (the tiny checkpoints need no more; the shipped 1024 MB per model is for real weights)."""
    for model in models:
        source, target = REPOSITORY / model, directory / model
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        cpu = target / "configs" / "cpu.pbtxt"
        text, count = re.subn(r'(key: "kv_cache_memory_mb" value: \{ string_value: ")\d+(")', rf"\g<1>{kv_cache_mb}\2",
                              cpu.read_text())  # fmt: skip
        assert count == 1, f"kv_cache_memory_mb not found in {cpu}"
        cpu.write_text(text)
    return directory


# The session's tritonserver (its stubs hold about 1 GB each) runs only as long as tests need it: the test files that
# use it run first, back to back (tests/frontend, then tests/triton's; the order within each file is kept), and it
# and the session frontend stop after the last test that uses them, not at the end of the session. So it never runs
# beside the stack that tests/stack starts with serve.sh, nor beside tests/unit's engines.
_last_user: dict[str, str] = {}
_release: dict[str, Callable[[], object]] = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items) -> None:
    def uses(item, name: str) -> bool:
        return name in getattr(item, "fixturenames", ())

    files_using_the_server = {item.nodeid.split("::")[0] for item in items if uses(item, "server")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in files_using_the_server)  # stable
    for item in items:
        for name in ("server", "frontend"):
            if uses(item, name):
                _last_user[name] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    for name in ("frontend", "server"):  # the frontend first: it talks to the server
        if _last_user.get(name) == item.nodeid and name in _release:
            _release.pop(name)()
    return result


# LoRA adapters of the session's full model (peft on the tiny checkpoint, rank 4, about 2 s to make): two served from
# start-up (lora_modules) and a directory for runtime loads (lora_dir) holding a third; two slots, so three adapters
# in turn evict one another. tests/frontend/test_lora.py uses them.
LORA_MODEL = "minicpm_v_2_6"
LORA_MODULES = ("invoices-lora", "receipts-lora")
LORA_RUNTIME = "customs"  # a directory under lora_dir


@dataclass(frozen=True)
class LoRASetup:
    modules: dict[str, Path]  # name -> directory, served from start-up
    lora_dir: Path  # runtime loads: from under it only


@pytest.fixture(scope="session")
def lora_setup(tiny_full, tmp_path_factory) -> LoRASetup:
    from tests.lora_adapters import ATTENTION, make_adapter

    root = tmp_path_factory.mktemp("lora")
    modules = {name: make_adapter(tiny_full, root / "static" / name, 4, ATTENTION, seed)
               for seed, name in enumerate(LORA_MODULES, start=1)}  # fmt: skip
    lora_dir = root / "runtime"
    make_adapter(tiny_full, lora_dir / LORA_RUNTIME, 4, ATTENTION, len(LORA_MODULES) + 1)
    return LoRASetup(modules, lora_dir)


@pytest.fixture(scope="session")
def server(tiny_full, tiny_int4, lora_setup, tmp_path_factory):
    suffix = "_" + LORA_MODEL.upper()
    env = {
        "MINICPMV_CHECKPOINT_MINICPM_V_2_6": str(tiny_full),
        "MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4": str(tiny_int4),
        "MINICPMV_DTYPE": "float32",
        "OMP_NUM_THREADS": "2",
        "MINICPMV_LORA_MODULES" + suffix: ",".join(f"{name}={path}" for name, path in lora_setup.modules.items()),
        "MINICPMV_LORA_DIR" + suffix: str(lora_setup.lora_dir),
        "MINICPMV_MAX_LORAS" + suffix: "2",
        "MINICPMV_MAX_LORA_RANK" + suffix: "8",
    }
    repository = serving_repository(tmp_path_factory.mktemp("model_repository"))
    triton = TritonServer(repository, models=list(MODELS), extra_env=env, extra_args=["--model-config-name=cpu"],
                          exit_timeout=10, address="127.0.0.1", die_with_parent=True)  # fmt: skip
    triton.start()
    _release["server"] = triton.stop
    try:
        triton.wait_ready(timeout=300)
        yield triton
    finally:
        _release.pop("server", None)
        triton.stop()
