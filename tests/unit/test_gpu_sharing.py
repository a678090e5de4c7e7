"""Both models on one GPU (issue 22): each gets a share of the GPU, so the second to load still gets a KV cache.

``gpu_memory_utilization`` "auto" (the GPU configs) is 0.9 divided by MINICPMV_ENGINES_PER_GPU, which
scripts/launch_triton.py sets to the number of models it loads on GPUs; the KV budget of an engine is its share
of the GPU's total memory less its own weights, at most 95% of what is free (``kv_pool.cuda_kv_budget``). The
memory figures below are made up from README's: weights of about 16.2 GB (bf16) and 7 GB (nf4), and a CUDA
context per process that ``memory_reserved`` does not count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from minicpmv.engine.kv_pool import cuda_kv_budget
from minicpmv_triton.launcher import free_port
from minicpmv_triton.parameters import ENGINES_PER_GPU_ENV, ModelParameters, gpu_memory_share

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
BOTH = ["minicpm_v_2_6", "minicpm_v_2_6_int4"]
GIB = 2**30
WEIGHTS = {"minicpm_v_2_6": int(16.2e9), "minicpm_v_2_6_int4": int(7.0e9)}
CUDA_CONTEXT = 500 * 2**20
# Qwen2-7B's KV per token in bf16: 28 layers x (K + V) x 4 KV heads x 128 x 2 bytes.
KV_BYTES_PER_TOKEN = 28 * 2 * 4 * 128 * 2
MAX_CONTEXT = 32768


def _load_launch_triton():
    spec = importlib.util.spec_from_file_location("launch_triton", ROOT / "scripts" / "launch_triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch_triton = _load_launch_triton()


def real_parameters(model: str, environ: dict[str, str], config_file: str = "config.pbtxt") -> ModelParameters:
    """``model``'s parameters as its instance on GPU 0 reads them from the shipped config and ``environ``."""
    text = (REPOSITORY / model / config_file).read_text()
    raw = dict(re.findall(r'^parameters: \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', text, re.M))
    config = {"name": model, "parameters": {k: {"string_value": v} for k, v in raw.items()}}
    args = {"model_name": model, "model_instance_kind": "GPU", "model_instance_device_id": "0"}
    return ModelParameters.from_model_config(config, args, environ)


def load_one_after_another(total: int, engines: list[tuple[str, float]]) -> list[int]:
    """The KV budget each engine gets when they load one after another on one GPU of ``total`` bytes, each
    holding its CUDA context, its weights and then its KV cache (``engines``: (model, gpu_memory_utilization))."""
    taken, budgets = 0, []
    for model, share in engines:
        own = WEIGHTS[model]
        free = max(0, total - taken - CUDA_CONTEXT - own)
        budget = cuda_kv_budget(free, total, own, share)
        budgets.append(budget)
        taken += CUDA_CONTEXT + own + budget
    return budgets


# --- the rule --------------------------------------------------------------------------------------------------


def test_the_share_is_the_default_split_evenly():
    assert gpu_memory_share(1) == pytest.approx(0.9)
    assert gpu_memory_share(2) == pytest.approx(0.45)
    assert gpu_memory_share(3) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        gpu_memory_share(0)


@pytest.mark.parametrize("model", BOTH)
def test_the_gpu_configs_ask_for_the_automatic_share(model):
    assert real_parameters(model, {}).engine.gpu_memory_utilization == pytest.approx(0.9)
    assert real_parameters(model, {ENGINES_PER_GPU_ENV: "2"}).engine.gpu_memory_utilization == pytest.approx(0.45)


def test_auto_and_unset_are_the_share_and_a_number_is_kept():
    def parse(environ, **parameters):
        config = {"name": "m", "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
        args = {"model_name": "m", "model_instance_kind": "GPU", "model_instance_device_id": "0"}
        return ModelParameters.from_model_config(config, args, environ).engine.gpu_memory_utilization

    two = {ENGINES_PER_GPU_ENV: "2"}
    assert parse(two, checkpoint="/c") == pytest.approx(0.45)
    assert parse(two, checkpoint="/c", gpu_memory_utilization="auto") == pytest.approx(0.45)
    assert parse(two, checkpoint="/c", gpu_memory_utilization="") == pytest.approx(0.45)
    assert parse(two, checkpoint="/c", gpu_memory_utilization="0.6") == pytest.approx(0.6)  # the operator's
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ValueError, match=f"m: {ENGINES_PER_GPU_ENV} must be a whole number >= 1"):
            parse({ENGINES_PER_GPU_ENV: bad}, checkpoint="/c")


def test_the_gpu_device_the_launcher_sets_is_the_instances_gpu():
    environ = {"MINICPMV_DEVICE": "gpu"}
    assert real_parameters("minicpm_v_2_6_int4", environ).device == "cuda:0"
    config = {"name": "m", "parameters": {"checkpoint": {"string_value": "/c"}}}
    args = {"model_name": "m", "model_instance_kind": "GPU", "model_instance_device_id": "3"}
    assert ModelParameters.from_model_config(config, args, environ).device == "cuda:3"
    assert ModelParameters.from_model_config(config, {"model_name": "m"}, environ).device == "cuda"


# --- the launcher ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("models", "device", "expected"), [
    (BOTH, "gpu", "2"), (BOTH[1:], "gpu", "1"), (BOTH, "cpu", None),
])  # fmt: skip
def test_the_launcher_tells_the_models_how_many_share_a_gpu(models, device, expected):
    args = launch_triton.parse_args(["--models", ",".join(models), "--device", device])
    env = launch_triton.server_env(args, device, launch_triton.model_names(REPOSITORY, args.models), environ={})
    assert env.get(ENGINES_PER_GPU_ENV) == expected
    assert env["MINICPMV_DEVICE"] == device


def test_the_launcher_keeps_the_operators_count():
    args = launch_triton.parse_args(["--models", ",".join(BOTH), "--device", "gpu"])
    env = launch_triton.server_env(args, "gpu", BOTH, environ={ENGINES_PER_GPU_ENV: "4"})
    assert ENGINES_PER_GPU_ENV not in env  # the server inherits the operator's 4


def test_the_launcher_with_every_model_of_the_repository_counts_them_all():
    args = launch_triton.parse_args(["--device", "gpu"])
    env = launch_triton.server_env(args, "gpu", launch_triton.model_names(REPOSITORY, args.models), environ={})
    assert env[ENGINES_PER_GPU_ENV] == str(len(BOTH))


# --- the KV budget --------------------------------------------------------------------------------------------


def test_the_budget_arithmetic():
    # share of the total less the weights, capped at 95% of what is free, never negative
    assert cuda_kv_budget(free=60 * GIB, total=80 * GIB, own=16 * GIB, gpu_memory_utilization=0.45) == 20 * GIB
    assert cuda_kv_budget(free=10 * GIB, total=80 * GIB, own=16 * GIB, gpu_memory_utilization=0.45) == 9.5 * GIB
    assert cuda_kv_budget(free=60 * GIB, total=24 * GIB, own=16 * GIB, gpu_memory_utilization=0.45) == 0


@pytest.mark.parametrize("order", [BOTH, BOTH[::-1]], ids=["full-first", "int4-first"])
def test_at_the_old_09_each_the_second_model_gets_nothing(order):
    """What issue 22 found: the first model takes 90% of the GPU, the second finds (nearly) nothing left: at most
    95% of the crumbs (int4 first: the full model's weights don't even fit), and then no room for activations."""
    budgets = load_one_after_another(80 * GIB, [(model, 0.9) for model in order])
    assert budgets[0] > 40 * GIB
    assert budgets[1] < GIB


@pytest.mark.parametrize("total_gib", [80, 48, 40])
@pytest.mark.parametrize("order", [BOTH, BOTH[::-1]], ids=["full-first", "int4-first"])
def test_with_the_launchers_shares_both_models_get_a_cache(order, total_gib):
    args = launch_triton.parse_args(["--models", ",".join(order), "--device", "gpu"])
    environ = launch_triton.server_env(args, "gpu", order, environ={})
    shares = [real_parameters(model, environ).engine.gpu_memory_utilization for model in order]
    assert shares == [pytest.approx(0.45)] * 2

    total = total_gib * GIB
    budgets = load_one_after_another(total, list(zip(order, shares, strict=True)))

    # Either order: each holds at least one whole context, and the same as it would have loading first.
    assert all(budget >= MAX_CONTEXT * KV_BYTES_PER_TOKEN for budget in budgets), budgets
    assert budgets == load_one_after_another(total, list(zip(order, shares, strict=True))[::-1])[::-1]
    assert sum(budgets) + sum(WEIGHTS.values()) <= 0.9 * total  # the shares add up to 0.9


# --- serve.sh --model both -------------------------------------------------------------------------------------

_RECORDER = r"""
import importlib.util, json, os, sys

spec = importlib.util.spec_from_file_location("launch_triton", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)


class Recorder:  # in place of TritonServer: note what would be started, start nothing
    def __init__(self, repository, models=None, extra_env=None, extra_args=None, **kwargs):
        with open(os.environ["RECORD_LAUNCH"], "w") as out:
            json.dump({"models": models, "env": extra_env, "args": extra_args}, out)

    def start(self):
        raise FileNotFoundError("recorded, not started")


module.TritonServer = Recorder
sys.exit(module.main(sys.argv[2:]))
"""


def test_serve_sh_both_on_a_gpu_gives_each_model_half_the_share(tiny_full, tiny_int4, tmp_path):
    """serve.sh --model both --device gpu, up to the launcher (a recorder in place of tritonserver): the
    environment it gives the server makes each model's instance on GPU 0 take 0.45."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "record_launch.py").write_text(_RECORDER)
    python = bin_dir / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "${{1:-}}" == */scripts/launch_triton.py ]]; then exec {sys.executable} {tmp_path}/record_launch.py'
        ' "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "launch.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MINICPMV_"))}
    env.update(
        MINICPMV_SKIP_SETUP="1", MINICPMV_VENV=str(tmp_path / "venv"), MINICPMV_SERVE_LOG_DIR=str(tmp_path / "logs"),
        HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", RECORD_LAUNCH=str(record),
    )  # fmt: skip
    ports = set()
    while len(ports) < 4:
        ports.add(str(free_port()))
    port, http, grpc, metrics = ports
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve.sh"), "--model", "both", "--device", "gpu", "--host", "127.0.0.1",
         "--checkpoint-full", str(tiny_full), "--checkpoint-int4", str(tiny_int4), "--port", port,
         "--triton-http-port", http, "--triton-grpc-port", grpc, "--triton-metrics-port", metrics],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert record.is_file(), result.stderr
    launched = json.loads(record.read_text())

    assert launched["models"] == BOTH
    assert launched["env"][ENGINES_PER_GPU_ENV] == "2"
    for model in BOTH:
        params = real_parameters(model, launched["env"])
        assert params.device == "cuda:0"
        assert params.engine.gpu_memory_utilization == pytest.approx(0.45)
    assert result.returncode == 1 and "tritonserver did not start" in result.stderr  # the recorder started nothing
