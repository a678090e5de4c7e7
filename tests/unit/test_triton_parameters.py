"""config.pbtxt ``parameters`` -> ModelParameters, as ``initialize`` gets them from Triton.

Triton passes the model config as JSON (``parameters`` map to ``{"string_value": ...}``) and ``args`` with
``model_instance_kind`` "CPU" / "GPU" (TRITONSERVER_InstanceGroupKindString) and ``model_instance_device_id``.
Every test passes ``environ`` explicitly, so the developer's environment cannot leak in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from minicpmv.engine.engine import EngineConfig
from minicpmv_triton.parameters import ModelParameters

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MODEL_DIRS = sorted(path.parent for path in REPOSITORY.glob("*/config.pbtxt"))
_PARAMETER = re.compile(r'^parameters:\s*\{\s*key:\s*"([^"]*)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}\s*$')


def model_config(name: str = "minicpm_v_2_6", **parameters: str) -> dict:
    return {"name": name, "parameters": {key: {"string_value": value} for key, value in parameters.items()}}


def triton_args(kind: str = "CPU", device_id: str = "0", name: str = "minicpm_v_2_6") -> dict:
    return {"model_name": name, "model_instance_kind": kind, "model_instance_device_id": device_id}


def parse(environ: dict | None = None, kind: str = "CPU", device_id: str = "0", **parameters: str):
    parameters.setdefault("checkpoint", "openbmb/MiniCPM-V-2_6")
    return ModelParameters.from_model_config(model_config(**parameters), triton_args(kind, device_id), environ or {})


def pbtxt_parameters(text: str) -> dict[str, str]:
    """The ``parameters: { key: "k" value: { string_value: "v" } }`` lines of a config.pbtxt."""
    return dict(match.groups() for line in text.splitlines() if (match := _PARAMETER.match(line.strip())))


# --- typed values --------------------------------------------------------------------------------------------


def test_parameters_are_typed():
    params = parse(
        max_num_seqs="8", max_num_batched_tokens="1024", max_waiting="32", vision_cache_size="5",
        default_max_slice_nums="4", max_model_len="8192", dtype="float16", quantization="nf4", device="cuda:2",
        gpu_memory_utilization="0.8", enable_prefix_caching="false", block_size="32", kv_cache_memory_mb="2048",
        attention_backend="reference",
    )  # fmt: skip

    assert params == ModelParameters(
        model_name="minicpm_v_2_6", checkpoint="openbmb/MiniCPM-V-2_6", device="cuda:2", dtype="float16",
        quantization="nf4", engine=EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=1024, max_waiting=32, vision_cache_size=5,
            default_max_slice_nums=4, max_model_len=8192, gpu_memory_utilization=0.8, enable_prefix_caching=False,
            block_size=32, kv_cache_memory_mb=2048, attention_backend="reference"),
    )  # fmt: skip


def test_every_engine_setting_is_a_parameter():
    from dataclasses import fields

    assert {f.name for f in fields(EngineConfig)} <= set(_engine_parameter_names())


def _engine_parameter_names() -> list[str]:
    from minicpmv_triton.parameters import _ENGINE_FIELDS

    return list(_ENGINE_FIELDS)


def test_only_a_checkpoint_gives_the_defaults():
    defaults = ModelParameters(model_name="minicpm_v_2_6", checkpoint="openbmb/MiniCPM-V-2_6")
    assert parse() == defaults
    assert (defaults.dtype, defaults.quantization, defaults.engine.default_max_slice_nums) == ("auto", None, None)


def test_empty_and_padded_values():
    params = parse(max_num_seqs=" 8 ", max_waiting="", max_model_len="", dtype="", quantization="", device="")
    assert params.engine.max_num_seqs == 8
    assert params.engine.max_waiting == EngineConfig.max_waiting
    assert params.engine.max_model_len is None
    assert (params.dtype, params.quantization, params.device) == ("auto", None, "cpu")


@pytest.mark.parametrize("value", ["", "none", "nf4"])
def test_quantization_may_be_empty_none_or_nf4(value):
    assert parse(quantization=value).quantization == (None if value in ("", "none") else value)


def test_model_name_comes_from_args_or_else_the_config():
    assert parse().model_name == "minicpm_v_2_6"
    params = ModelParameters.from_model_config(
        model_config("from_config", checkpoint="c"), {"model_instance_kind": "CPU"}, {}
    )
    assert params.model_name == "from_config"


# --- environment overrides -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "from-parameter"),
        ({"MINICPMV_CHECKPOINT": "/ckpt/generic"}, "/ckpt/generic"),
        ({"MINICPMV_CHECKPOINT_MINICPM_V_2_6": "/ckpt/model"}, "/ckpt/model"),
        ({"MINICPMV_CHECKPOINT": "/ckpt/generic", "MINICPMV_CHECKPOINT_MINICPM_V_2_6": "/ckpt/model"}, "/ckpt/model"),
        ({"MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4": "/ckpt/other-model"}, "from-parameter"),
        ({"MINICPMV_CHECKPOINT": "", "MINICPMV_CHECKPOINT_MINICPM_V_2_6": ""}, "from-parameter"),
    ],
    ids=["parameter", "generic-env", "model-env", "model-env-beats-generic", "other-model-env", "empty-env"],
)
def test_checkpoint_precedence(environ, expected):
    assert parse(environ, checkpoint="from-parameter").checkpoint == expected


def test_checkpoint_env_name_is_the_model_name_upper_cased():
    args = triton_args(name="minicpm-v.test")
    environ = {"MINICPMV_CHECKPOINT_MINICPM_V_TEST": "/ckpt/test"}
    assert ModelParameters.from_model_config(model_config("minicpm-v.test"), args, environ).checkpoint == "/ckpt/test"


def test_env_checkpoint_replaces_a_missing_parameter():
    params = ModelParameters.from_model_config(model_config(), triton_args(), {"MINICPMV_CHECKPOINT": "/ckpt"})
    assert params.checkpoint == "/ckpt"


def test_env_device_beats_the_parameter_and_the_instance_kind():
    assert parse({"MINICPMV_DEVICE": "cpu"}, kind="GPU", device="cuda:1").device == "cpu"


def test_env_dtype_beats_the_parameter():
    assert parse({"MINICPMV_DTYPE": "float32"}, dtype="bfloat16").dtype == "float32"
    assert parse(dtype="bfloat16").dtype == "bfloat16"


# --- device resolution ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "device_id", "device_parameter", "expected"),
    [
        ("GPU", "1", None, "cuda:1"),
        ("GPU", "0", "auto", "cuda:0"),
        ("CPU", "3", None, "cpu"),
        ("CPU", "0", "auto", "cpu"),
        ("GPU", "1", "cuda:0", "cuda:0"),
    ],
)
def test_device_follows_the_instance_kind_unless_given(kind, device_id, device_parameter, expected):
    extra = {} if device_parameter is None else {"device": device_parameter}
    assert parse(kind=kind, device_id=device_id, **extra).device == expected


def test_gpu_instance_without_a_device_id_is_cuda_0():
    args = {"model_name": "m", "model_instance_kind": "GPU"}
    assert ModelParameters.from_model_config(model_config(checkpoint="c"), args, {}).device == "cuda:0"


@pytest.mark.parametrize(("cuda", "expected"), [(True, "cuda"), (False, "cpu")])
def test_other_instance_kinds_use_cuda_when_available(monkeypatch, cuda, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert parse(kind="MODEL").device == expected


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "error"),
    [
        ({"max_num_seqs": "eight"}, "minicpm_v_2_6: parameter 'max_num_seqs' must be an integer, got 'eight'"),
        ({"max_num_batched_tokens": "8.5"}, "parameter 'max_num_batched_tokens' must be an integer, got '8.5'"),
        ({"gpu_memory_utilization": "most"}, "parameter 'gpu_memory_utilization' must be a number, got 'most'"),
        ({"gpu_memory_utilization": "1.5"}, "gpu_memory_utilization must be in (0, 1]"),
        ({"enable_prefix_caching": "maybe"}, "parameter 'enable_prefix_caching' must be true or false"),
        ({"default_max_slice_nums": "nine"}, "parameter 'default_max_slice_nums' must be an integer"),
        ({"max_batch_tokens": "8"}, "minicpm_v_2_6: unknown parameter 'max_batch_tokens' in config.pbtxt"),
        ({"quantization": "int8"}, "parameter 'quantization' must be empty or 'nf4'"),
        ({"quantization": "NF4"}, "parameter 'quantization' must be empty or 'nf4'"),
        ({"max_num_seqs": "0"}, "max_num_seqs must be >= 1"),
        ({"max_waiting": "-1"}, "max_waiting must be >= 1"),
    ],
)
def test_bad_parameters_fail_with_a_message_naming_them(parameters, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        parse(**parameters)


def test_default_max_slice_nums_below_one_is_rejected_at_start_up():
    # Otherwise every image request fails later, inside the image processor (max_slice_nums must be >= 1).
    with pytest.raises(ValueError, match="default_max_slice_nums"):
        parse(default_max_slice_nums="0")


@pytest.mark.parametrize("parameters", [{}, {"checkpoint": ""}], ids=["absent", "empty"])
def test_missing_checkpoint_names_the_parameter_and_the_env_var(parameters):
    config = model_config("minicpm_v_2_6_int4", **parameters)
    with pytest.raises(ValueError, match="'checkpoint'.*MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4"):
        ModelParameters.from_model_config(config, triton_args(name="minicpm_v_2_6_int4"), {})


def test_engine_config_carries_the_limits():
    params = parse(
        max_num_seqs="4", max_num_batched_tokens="300", max_waiting="7", vision_cache_size="2",
        default_max_slice_nums="3", max_model_len="900", kv_cache_memory_mb="64", enable_prefix_caching="true",
    )  # fmt: skip
    assert params.engine_config() == EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=300, max_waiting=7, max_model_len=900, vision_cache_size=2,
        default_max_slice_nums=3, kv_cache_memory_mb=64, enable_prefix_caching=True,
    )  # fmt: skip


# --- the real model repository -------------------------------------------------------------------------------


def test_the_repository_has_both_models():
    assert [path.name for path in MODEL_DIRS] == ["minicpm_v_2_6", "minicpm_v_2_6_int4"]


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda path: path.name)
@pytest.mark.parametrize("config_file", ["config.pbtxt", "configs/cpu.pbtxt"])
def test_real_config_parameters_are_accepted(model_dir, config_file):
    raw = pbtxt_parameters((model_dir / config_file).read_text())
    assert "checkpoint" in raw
    config = {"name": model_dir.name, "parameters": {key: {"string_value": value} for key, value in raw.items()}}

    params = ModelParameters.from_model_config(config, triton_args("GPU", "0", model_dir.name), {})

    assert params.model_name == model_dir.name
    assert params.checkpoint == raw["checkpoint"]
    assert params.device == "cuda:0"
    for key in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "default_max_slice_nums",
                "kv_cache_memory_mb"):  # fmt: skip
        if key in raw:
            assert getattr(params.engine, key) == int(raw[key])
    if raw.get("gpu_memory_utilization") == "auto":  # 0.9 split between the engines on a GPU (test_gpu_sharing.py)
        assert params.engine.gpu_memory_utilization == pytest.approx(0.9)
    elif "gpu_memory_utilization" in raw:
        assert params.engine.gpu_memory_utilization == float(raw["gpu_memory_utilization"])


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda path: path.name)
def test_the_env_var_documented_in_a_config_overrides_its_checkpoint(model_dir):
    text = (model_dir / "config.pbtxt").read_text()
    documented = re.findall(r"^#.*\b(MINICPMV_CHECKPOINT_\w+)", text, flags=re.MULTILINE)
    assert len(documented) == 1
    raw = pbtxt_parameters(text)
    config = {"name": model_dir.name, "parameters": {key: {"string_value": value} for key, value in raw.items()}}

    params = ModelParameters.from_model_config(
        config, triton_args("CPU", "0", model_dir.name), {documented[0]: "/tiny"}
    )

    assert params.checkpoint == "/tiny"
