"""The model repository agrees with the adapter: config.pbtxt files, their CPU variants, and the thin model.py.

backend.py imports triton_python_backend_utils (only inside Triton), so its INPUT_NAMES are read from its
source with ``ast``; the outputs are the ones ``response_tensors`` produces.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import minicpmv_triton
from minicpmv.engine.request import Delta
from minicpmv_triton.parameters import queue_mismatch
from minicpmv_triton.tensors import parse_request, response_tensors

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
MODEL_DIRS = sorted(path.parent for path in REPOSITORY.glob("*/config.pbtxt"))
BACKEND = Path(minicpmv_triton.__file__).parent / "backend.py"
CHECKPOINTS = {"minicpm_v_2_6": "openbmb/MiniCPM-V-2_6", "minicpm_v_2_6_int4": "openbmb/MiniCPM-V-2_6-int4"}
NUMPY_TO_TRITON = {np.dtype(np.object_): "TYPE_STRING", np.dtype(np.uint32): "TYPE_UINT32"}
_TENSOR = re.compile(r'\{\s*name:\s*"(\w+)"\s+data_type:\s*(TYPE_\w+)\s+dims:\s*\[([^\]]*)\]')

models = pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda path: path.name)


def settings(model_dir: Path, config_file: str = "config.pbtxt") -> str:
    """The config without its comment lines."""
    lines = (model_dir / config_file).read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def top_level(text: str, key: str) -> str:
    (value,) = re.findall(rf'^{key}:\s*"?([^"\n]*?)"?\s*$', text, flags=re.MULTILINE)
    return value


def tensor_specs(text: str, section: str) -> dict[str, tuple[str, list[int]]]:
    """``input [ ... ]`` / ``output [ ... ]`` -> {name: (data_type, dims)}."""
    (body,) = re.findall(rf"^{section} \[\n(.*?)^\]", text, flags=re.MULTILINE | re.DOTALL)
    specs = _TENSOR.findall(body)
    assert len(specs) == body.count("name:"), f"unparsed {section} entries"
    return {name: (data_type, [int(d) for d in dims.split()]) for name, data_type, dims in specs}


def backend_input_names() -> tuple[str, ...]:
    for node in ast.parse(BACKEND.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["INPUT_NAMES"]:
            return ast.literal_eval(node.value)
    raise AssertionError("backend.py has no INPUT_NAMES")


def all_outputs() -> dict[str, np.ndarray]:
    """What response_tensors produces when a request asks for every optional output."""
    flags = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", "return_logprobs")
    inputs = {"text_input": np.array([[b"x"]], dtype=np.object_)}
    inputs.update({name: np.array([[True]]) for name in flags})
    delta = Delta("r", 0, "t", [1], prompt_tokens=3, completion_tokens=1, finish_reason="stop")
    return response_tensors(parse_request("r", inputs), delta, "t")


def test_the_repository_has_both_models():
    assert [path.name for path in MODEL_DIRS] == sorted(CHECKPOINTS)


@models
def test_the_directory_is_named_after_the_model(model_dir):
    assert top_level(settings(model_dir), "name") == model_dir.name
    assert top_level(settings(model_dir, "configs/cpu.pbtxt"), "name") == model_dir.name


SIZING = {"max_num_seqs", "gpu_memory_utilization", "kv_cache_memory_mb", "max_num_batched_tokens",
          "max_prefill_attention_pairs"}


@models
def test_the_cpu_variant_differs_only_in_instance_kind_and_engine_sizing(model_dir):
    def parts(text: str) -> tuple[list[str], dict[str, str]]:
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        params = dict(re.findall(r'parameters: \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', text))
        return [line for line in lines if not line.startswith("parameters:")], params

    gpu_lines, gpu_params = parts((model_dir / "config.pbtxt").read_text())
    cpu_lines, cpu_params = parts((model_dir / "configs" / "cpu.pbtxt").read_text())
    gpu_instances = "instance_group [ { count: 1 kind: KIND_GPU } ]"
    assert [(g, c) for g, c in zip(gpu_lines, cpu_lines, strict=True) if g != c] == [
        (gpu_instances, gpu_instances.replace("KIND_GPU", "KIND_CPU"))]
    differing = {k for k in gpu_params.keys() | cpu_params.keys() if gpu_params.get(k) != cpu_params.get(k)}
    assert differing <= SIZING, differing
    assert "gpu_memory_utilization" in gpu_params and "kv_cache_memory_mb" in cpu_params


@models
@pytest.mark.parametrize("config_file", ["config.pbtxt", "configs/cpu.pbtxt"])
def test_python_backend_decoupled_with_a_bounded_queue(model_dir, config_file):
    text = settings(model_dir, config_file)
    assert top_level(text, "backend") == "python"
    assert re.search(r"^model_transaction_policy\s*\{\s*decoupled:\s*true\s*\}", text, flags=re.MULTILINE)
    (batching,) = re.findall(r"^dynamic_batching\s*\{(.*?)^\}", text, flags=re.MULTILINE | re.DOTALL)
    (queue_size,) = re.findall(r"default_queue_policy\s*\{[^}]*max_queue_size:\s*(\d+)", batching)
    assert int(queue_size) > 0  # 0 would be Triton's unbounded queue
    # Not below the engine's queue: Triton must not refuse a burst that the engine would queue (issue 27).
    (max_waiting,) = re.findall(r'key: "max_waiting" value: \{ string_value: "(\d+)" \}', text)
    assert int(queue_size) >= int(max_waiting)
    model_config = {"dynamic_batching": {"default_queue_policy": {"max_queue_size": queue_size}}}
    assert queue_mismatch(model_config, int(max_waiting)) is None
    assert "below the engine's max_waiting" in queue_mismatch(model_config, int(queue_size) + 1)
    # response_tensors includes the batch dimension, which exists only with max_batch_size > 0.
    assert int(top_level(text, "max_batch_size")) >= 1


@models
def test_declared_inputs_are_the_ones_the_backend_reads(model_dir):
    declared = tensor_specs(settings(model_dir), "input")
    assert sorted(declared) == sorted(backend_input_names())


@models
def test_declared_input_types_match_the_parser(model_dir):
    declared = tensor_specs(settings(model_dir), "input")
    flags = {name for name, (data_type, _) in declared.items() if data_type == "TYPE_BOOL"}
    assert flags == {
        "stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
        "return_num_output_tokens", "return_logprobs",
    }  # fmt: skip
    assert {name: declared[name] for name in declared.keys() - flags} == {
        "text_input": ("TYPE_STRING", [1]),
        "messages": ("TYPE_STRING", [1]),
        "sampling_parameters": ("TYPE_STRING", [1]),
        "image": ("TYPE_STRING", [-1]),  # one element per image
        "lora_control": ("TYPE_STRING", [1]),  # a LoRA control request (JSON)
    }


@models
def test_every_bool_input_sets_the_parsed_field_of_its_name(model_dir):
    declared = tensor_specs(settings(model_dir), "input")
    for name, (data_type, _) in declared.items():
        if data_type != "TYPE_BOOL":
            continue
        inputs = {"text_input": np.array([[b"x"]], dtype=np.object_), name: np.array([[True]])}
        assert getattr(parse_request("r", inputs), name) is True, name


def test_response_tensors_produce_the_documented_outputs():
    outputs = {"text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "logprobs", "index"}
    assert set(all_outputs()) == outputs


@models
def test_declared_outputs_cover_response_tensors_with_matching_types(model_dir):
    declared = tensor_specs(settings(model_dir), "output")
    for name, array in all_outputs().items():
        assert name in declared, f"{name} is produced but not declared"
        data_type, dims = declared[name]
        assert data_type == NUMPY_TO_TRITON[array.dtype], name
        # The first array dimension is the batch; the rest must fit the declared dims (-1: any size).
        assert array.ndim == 1 + len(dims), name
        assert all(d in (-1, size) for d, size in zip(dims, array.shape[1:], strict=True)), name


@models
def test_model_py_only_re_exports_the_backend_model(model_dir):
    tree = ast.parse((model_dir / "1" / "model.py").read_text())
    statements = [
        node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
    ]
    assert len(statements) == 1
    (statement,) = statements
    assert isinstance(statement, ast.ImportFrom)
    assert statement.module == "minicpmv_triton.backend"
    assert [(alias.name, alias.asname) for alias in statement.names] == [("TritonPythonModel", None)]


def test_the_backend_defines_the_re_exported_model():
    classes = {node.name for node in ast.parse(BACKEND.read_text()).body if isinstance(node, ast.ClassDef)}
    assert "TritonPythonModel" in classes


@pytest.mark.parametrize("config_file", ["config.pbtxt", "configs/cpu.pbtxt"])
def test_the_two_models_differ_in_name_and_checkpoint_only(config_file):
    full, int4 = (settings(REPOSITORY / name, config_file).splitlines() for name in sorted(CHECKPOINTS))
    assert len(full) == len(int4)
    changed = [(a, b) for a, b in zip(full, int4, strict=True) if a != b]
    checkpoint_line = 'parameters: {{ key: "checkpoint" value: {{ string_value: "{}" }} }}'
    assert changed == [
        ('name: "minicpm_v_2_6"', 'name: "minicpm_v_2_6_int4"'),
        (
            checkpoint_line.format(CHECKPOINTS["minicpm_v_2_6"]),
            checkpoint_line.format(CHECKPOINTS["minicpm_v_2_6_int4"]),
        ),
    ]
