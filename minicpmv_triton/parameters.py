"""The ``parameters`` of a model's config.pbtxt, typed and validated once in ``initialize``.

Environment variables override them, so tests and the demo point the same model repository at tiny
checkpoints: ``MINICPMV_CHECKPOINT_<MODEL_NAME>`` (e.g. ``MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4``), then
``MINICPMV_CHECKPOINT``; ``MINICPMV_DEVICE``; ``MINICPMV_DTYPE``; and the LoRA parameters (``LORA_PARAMETERS``),
each ``MINICPMV_<PARAMETER>_<MODEL_NAME>`` then ``MINICPMV_<PARAMETER>`` (e.g. ``MINICPMV_LORA_MODULES``, what
``serve.sh --lora-modules`` sets). ``lora_dir`` turns LoRA on (``enable_lora``) and must be a directory.

Several engines on one GPU: ``gpu_memory_utilization`` "auto" (or unset) is EngineConfig's default (0.9) divided by
``MINICPMV_ENGINES_PER_GPU`` (default 1), the number of model instances sharing each GPU (``gpu_memory_share``).
scripts/launch_triton.py sets it, on GPUs, to the number of models it loads (each has one instance per GPU), so
``serve.sh --model both`` gives each model 0.45. A number in config.pbtxt is taken as it is.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from minicpmv.engine.config import EngineConfig

# Engine parameters are EngineConfig's fields, typed by its annotations: one definition, no copy here.
_ENGINE_FIELDS = {f.name: str(f.type) for f in fields(EngineConfig)}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
ENGINES_PER_GPU_ENV = "MINICPMV_ENGINES_PER_GPU"
# EngineConfig fields the environment may set per model or for all (adapters are a deployment's, not the repository's).
LORA_PARAMETERS = ("enable_lora", "lora_modules", "lora_dir", "max_loras", "max_lora_rank", "lora_target_modules")


def env_override(environ, parameter: str, model_name: str) -> str | None:
    """``MINICPMV_<PARAMETER>_<MODEL_NAME>``, else ``MINICPMV_<PARAMETER>``, else None."""
    base = "MINICPMV_" + parameter.upper()
    model = base + "_" + re.sub(r"\W", "_", model_name).upper()
    return environ.get(model) or environ.get(base) or None


def gpu_memory_share(engines_per_gpu: int) -> float:
    """``gpu_memory_utilization`` "auto": EngineConfig's default share of a GPU (0.9) split evenly between the
    ``engines_per_gpu`` engines (model instances) on it; each engine's KV budget is its share of the GPU's total
    memory less its own weights (``kv_pool.cuda_kv_budget``). 1 engine: 0.9; 2: 0.45 each."""
    if engines_per_gpu < 1:
        raise ValueError(f"engines_per_gpu must be >= 1, got {engines_per_gpu}")
    return EngineConfig.gpu_memory_utilization / engines_per_gpu


def _engines_per_gpu(name: str, environ) -> int:
    text = (environ.get(ENGINES_PER_GPU_ENV) or "1").strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}: {ENGINES_PER_GPU_ENV} must be a whole number >= 1, got {text!r}")
    return int(text)


def _convert(name: str, key: str, annotation: str, text: str) -> Any:
    """``text`` as the type ``annotation`` names (int, float, bool, str; "| None" allows empty)."""
    kind = annotation.split("|")[0].strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ValueError(f"{name}: parameter '{key}' must be {'an integer' if kind == 'int' else 'a number'}, "
                         f"got {text!r}") from None  # fmt: skip
    if kind == "bool":
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{name}: parameter '{key}' must be true or false, got {text!r}")
        return text.lower() in _TRUE
    return text


@dataclass(frozen=True)
class ModelParameters:
    model_name: str
    checkpoint: str
    device: str = "cpu"
    dtype: str = "auto"
    quantization: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any], args: dict[str, str], environ=None) -> ModelParameters:
        """Raises ValueError naming the parameter and what to change."""
        environ = os.environ if environ is None else environ
        name = args.get("model_name") or model_config.get("name", "")
        raw = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
        for key in LORA_PARAMETERS:
            override = env_override(environ, key, name)
            if override is not None:
                raw[key] = override
        env_name = "MINICPMV_CHECKPOINT_" + re.sub(r"\W", "_", name).upper()
        checkpoint = environ.get(env_name) or environ.get("MINICPMV_CHECKPOINT") or raw.pop("checkpoint", "")
        raw.pop("checkpoint", None)
        if not checkpoint:
            raise ValueError(
                f"{name}: set parameter 'checkpoint' in config.pbtxt (a Hub id or a directory) or {env_name}"
            )
        values: dict[str, Any] = {}
        engine: dict[str, Any] = {}
        for key, text in raw.items():
            text = text.strip()
            if key == "gpu_memory_utilization" and text.lower() in ("", "auto"):
                continue  # set below
            if key in _ENGINE_FIELDS:
                if text:  # empty: EngineConfig's default
                    engine[key] = _convert(name, key, _ENGINE_FIELDS[key], text)
            elif key in ("device", "dtype", "quantization"):
                values[key] = text or None
            else:
                raise ValueError(f"{name}: unknown parameter '{key}' in config.pbtxt")
        device = environ.get("MINICPMV_DEVICE") or values.pop("device", None) or "auto"
        values["device"] = _resolve_device(device, args)
        values["dtype"] = environ.get("MINICPMV_DTYPE") or values.get("dtype") or "auto"
        if values.get("quantization") in ("", "none"):
            values["quantization"] = None
        if values.get("quantization") not in (None, "nf4"):
            raise ValueError(f"{name}: parameter 'quantization' must be empty or 'nf4'")
        if engine.get("lora_dir"):
            if not os.path.isdir(engine["lora_dir"]):
                raise ValueError(f"{name}: lora_dir {engine['lora_dir']!r} is not a directory")
            engine.setdefault("enable_lora", True)  # runtime loading needs LoRA on
        if "gpu_memory_utilization" not in engine:
            engine["gpu_memory_utilization"] = gpu_memory_share(_engines_per_gpu(name, environ))
        for key, low, high in (("default_max_slice_nums", 1, 36), ("vision_cache_size", 0, 100_000)):
            if key in engine and not low <= engine[key] <= high:
                raise ValueError(f"{name}: parameter '{key}' must be between {low} and {high}, got {engine[key]}")
        try:
            config = EngineConfig(**engine)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return cls(model_name=name, checkpoint=checkpoint, engine=config, **values)

    def describe(self) -> str:
        quant = f", quantization {self.quantization}" if self.quantization else ""
        share = ""
        if self.device.startswith("cuda") and self.engine.kv_cache_memory_mb is None:
            share = f", gpu_memory_utilization {self.engine.gpu_memory_utilization:.2f}"
        return (f"{self.checkpoint} on {self.device} ({self.dtype}{quant}, max_num_seqs {self.engine.max_num_seqs}"
                f"{share})")

    def checkpoint_dir(self):
        from minicpmv.weights import resolve_checkpoint

        return resolve_checkpoint(self.checkpoint)

    def engine_config(self) -> EngineConfig:
        return self.engine


def _resolve_device(device: str, args: dict[str, str]) -> str:
    """ "auto": the instance's GPU for KIND_GPU, else CUDA when available, else the CPU. "gpu" (what
    scripts/launch_triton.py --device gpu sets): the instance's GPU for KIND_GPU, else CUDA."""
    if device == "gpu":
        return _resolve_device("auto", args) if args.get("model_instance_kind") == "GPU" else "cuda"
    if device != "auto":
        return device
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    if args.get("model_instance_kind") == "CPU":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def queue_mismatch(model_config: dict, max_waiting: int) -> str | None:
    """A warning when Triton's queue (``dynamic_batching.default_queue_policy.max_queue_size``, in the model
    config Triton passes as JSON) is bounded below the engine's ``max_waiting``: Triton would refuse a burst that
    the engine would queue (the requests wait in Triton's queue while ``execute`` prepares the ones before)."""
    policy = (model_config.get("dynamic_batching") or {}).get("default_queue_policy") or {}
    size = int(policy.get("max_queue_size") or 0)  # 0: unbounded
    if 0 < size < max_waiting:
        return (f"Triton's max_queue_size ({size}) is below the engine's max_waiting ({max_waiting}): bursts the "
                f"engine would queue are refused; set max_queue_size to at least {max_waiting}")
    return None
