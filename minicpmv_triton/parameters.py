"""The ``parameters`` of a model's config.pbtxt, typed and validated once in ``initialize``.

Environment variables override them, so tests and the demo point the same model repository at tiny
checkpoints: ``MINICPMV_CHECKPOINT_<MODEL_NAME>`` (e.g. ``MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4``), then
``MINICPMV_CHECKPOINT``; ``MINICPMV_DEVICE``; ``MINICPMV_DTYPE``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from minicpmv.engine.engine import EngineConfig

_INT_FIELDS = ("max_num_seqs", "max_total_tokens", "max_prefill_tokens", "max_waiting", "vision_cache_size")


@dataclass(frozen=True)
class ModelParameters:
    model_name: str
    checkpoint: str
    device: str = "cpu"
    dtype: str = "auto"
    quantization: str | None = None
    # Engine limits: EngineConfig's defaults, so the two can't drift apart.
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_total_tokens: int = EngineConfig.max_total_tokens
    max_prefill_tokens: int = EngineConfig.max_prefill_tokens
    max_waiting: int = EngineConfig.max_waiting
    vision_cache_size: int = EngineConfig.vision_cache_size
    default_max_slice_nums: int | None = EngineConfig.default_max_slice_nums
    max_model_len: int | None = None

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any], args: dict[str, str], environ=None) -> ModelParameters:
        """Raises ValueError naming the parameter and what to change."""
        environ = os.environ if environ is None else environ
        name = args.get("model_name") or model_config.get("name", "")
        raw = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
        env_name = "MINICPMV_CHECKPOINT_" + re.sub(r"\W", "_", name).upper()
        checkpoint = environ.get(env_name) or environ.get("MINICPMV_CHECKPOINT") or raw.pop("checkpoint", "")
        raw.pop("checkpoint", None)
        if not checkpoint:
            raise ValueError(
                f"{name}: set parameter 'checkpoint' in config.pbtxt (a Hub id or a directory) or {env_name}"
            )
        values: dict[str, Any] = {}
        for key, text in raw.items():
            text = text.strip()
            if key in _INT_FIELDS or key in ("default_max_slice_nums", "max_model_len"):
                if not text:
                    continue
                try:
                    values[key] = int(text)
                except ValueError:
                    raise ValueError(f"{name}: parameter '{key}' must be an integer, got {text!r}") from None
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
        for key, low, high in (("default_max_slice_nums", 1, 36), ("vision_cache_size", 0, 100_000)):
            if key in values and not low <= values[key] <= high:
                raise ValueError(f"{name}: parameter '{key}' must be between {low} and {high}, got {values[key]}")
        params = cls(model_name=name, checkpoint=checkpoint, **values)
        params.engine_config()  # validates the limits
        return params

    def describe(self) -> str:
        quant = f", quantization {self.quantization}" if self.quantization else ""
        return f"{self.checkpoint} on {self.device} ({self.dtype}{quant}, max_num_seqs {self.max_num_seqs})"

    def checkpoint_dir(self):
        from minicpmv.weights import resolve_checkpoint

        return resolve_checkpoint(self.checkpoint)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_total_tokens=self.max_total_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            max_waiting=self.max_waiting,
            max_model_len=self.max_model_len,
            vision_cache_size=self.vision_cache_size,
            default_max_slice_nums=self.default_max_slice_nums,
        )


def _resolve_device(device: str, args: dict[str, str]) -> str:
    """ "auto": the instance's GPU for KIND_GPU, else CUDA when available, else the CPU."""
    if device != "auto":
        return device
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    if args.get("model_instance_kind") == "CPU":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
