"""Typed configuration of a MiniCPM-V 2.6 checkpoint, read from its ``config.json``.

The original checkpoint's config class derives from Qwen2's and fills in several fields
implicitly (``use_image_id``, ``vision_batch_size``, the slice defaults, the vision
activation and LayerNorm epsilon). We spell all of them out here so that a config.json
re-saved with or without those keys gives the same model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"

# int4 repository: bitsandbytes skips these module names (MODEL_FACTS §1.2).
DEFAULT_INT4_SKIP_MODULES = ("out_proj", "kv_proj", "lm_head")


class ConfigError(ValueError):
    """The checkpoint's configuration is missing, malformed or not MiniCPM-V 2.6."""


@dataclass(frozen=True)
class VisionConfig:
    """The navit SigLIP vision tower (``vpm``)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 980
    patch_size: int = 14
    num_channels: int = 3
    # Not in config.json; the remote SiglipVisionConfig defaults.
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class SliceConfig:
    max_slice_nums: int = 9
    patch_size: int = 14
    scale_resolution: int = 448


@dataclass(frozen=True)
class QuantizationConfig:
    """bitsandbytes 4-bit settings, as stored in the ``-int4`` repository's config.json."""

    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    use_double_quant: bool = True
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = DEFAULT_INT4_SKIP_MODULES
    blocksize: int = 64

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizationConfig:
        method = d.get("quant_method")
        if method != "bitsandbytes" or not d.get("load_in_4bit", d.get("_load_in_4bit", False)):
            raise ConfigError(
                f"unsupported quantization_config (quant_method={method!r}, "
                f"load_in_4bit={d.get('load_in_4bit')!r}); only bitsandbytes 4-bit checkpoints are supported"
            )
        return cls(
            quant_type=d.get("bnb_4bit_quant_type", "nf4"),
            compute_dtype=d.get("bnb_4bit_compute_dtype", "bfloat16"),
            use_double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
            quant_storage=d.get("bnb_4bit_quant_storage", "uint8"),
            skip_modules=tuple(d.get("llm_int8_skip_modules") or DEFAULT_INT4_SKIP_MODULES),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` block in the layout of the original ``-int4`` repository."""
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": self.quant_storage,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.use_double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }


@dataclass(frozen=True)
class MiniCPMVConfig:
    """MiniCPM-V 2.6: a Qwen2 LLM, a navit SigLIP vision tower and a perceiver resampler.

    The LLM fields sit at the top level of config.json, as in the original.
    """

    # LLM (Qwen2)
    vocab_size: int = 151666
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    torch_dtype: str = "bfloat16"
    # Multimodal
    vision: VisionConfig = field(default_factory=VisionConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)
    query_num: int = 64
    # The original config class defaults this to True (dropping a layer); 2.6 stores False.
    drop_vision_last_layer: bool = True
    use_image_id: bool = True
    vision_batch_size: int = 16
    version: float = 2.6
    name_or_path: str = ""
    quantization: QuantizationConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def resampler_num_heads(self) -> int:
        return self.hidden_size // 128

    @property
    def num_vision_layers_used(self) -> int:
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniCPMVConfig:
        """Parse a config.json dict; raises ConfigError if it is not a MiniCPM-V 2.6 config."""
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type != "minicpmv":
            raise ConfigError(
                f"model_type is {model_type!r}, expected 'minicpmv': this is not a MiniCPM-V checkpoint"
            )
        version = d.get("version")
        if version is None or abs(float(version) - 2.6) > 1e-6:
            raise ConfigError(
                f"MiniCPM-V version is {version!r}, expected 2.6 "
                "(MiniCPM-V 2.0/2.5 and 4.x are different models)"
            )
        vision_dict = d.get("vision_config")
        if not isinstance(vision_dict, dict):
            raise ConfigError("config.json has no vision_config object")
        try:
            vision = _build(VisionConfig, vision_dict)
            slice_cfg = _build(SliceConfig, d.get("slice_config") or {})
            llm_fields = {k: d[k] for k in _LLM_KEYS if k in d}
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if "rope_theta" not in llm_fields and isinstance(rope, dict) and "rope_theta" in rope:
                llm_fields["rope_theta"] = rope["rope_theta"]
            if rope and isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
                raise ConfigError(f"unsupported rope scaling {rope!r}: MiniCPM-V 2.6 uses default RoPE")
            if d.get("use_sliding_window"):
                raise ConfigError(
                    "use_sliding_window=true is not supported (MiniCPM-V 2.6 uses full attention)"
                )
            if "torch_dtype" not in llm_fields and isinstance(d.get("dtype"), str):
                llm_fields["torch_dtype"] = d["dtype"]  # configs re-saved by transformers 5.x
            eos = llm_fields.get("eos_token_id")
            if isinstance(eos, list):
                llm_fields["eos_token_id"] = int(eos[0])
            quant = d.get("quantization_config")
            cfg = cls(
                **llm_fields,
                vision=vision,
                slice=slice_cfg,
                query_num=int(d.get("query_num", 64)),
                drop_vision_last_layer=bool(d.get("drop_vision_last_layer", True)),
                use_image_id=bool(d.get("use_image_id", True)),
                vision_batch_size=int(d.get("vision_batch_size", 16)),
                version=float(version),
                name_or_path=str(d.get("_name_or_path", "")),
                quantization=QuantizationConfig.from_dict(quant) if quant else None,
            )
        except (TypeError, KeyError) as e:
            raise ConfigError(f"malformed MiniCPM-V config.json: {e}") from e
        cfg._validate()
        return cfg

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MiniCPMVConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"no {CONFIG_FILE} in {directory}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_size % 128:
            raise ConfigError("hidden_size must be a multiple of 128 (the resampler's head size)")
        if self.vision.hidden_size % self.vision.num_attention_heads:
            raise ConfigError("vision_config.hidden_size must be a multiple of its num_attention_heads")
        if self.slice.patch_size != self.vision.patch_size:
            raise ConfigError("slice_config.patch_size must equal vision_config.patch_size")
        if self.query_num < 1 or self.vision_batch_size < 1:
            raise ConfigError("query_num and vision_batch_size must be positive")

    def to_qwen2_config(self, attn_implementation: str = "sdpa"):
        """The transformers ``Qwen2Config`` of the LLM part."""
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            use_sliding_window=False,
            attention_dropout=self.attention_dropout,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=0,
        )
        cfg._attn_implementation = attn_implementation
        return cfg

    def to_vision_config(self, attn_implementation: str = "sdpa"):
        """A transformers ``Idefics2VisionConfig``: its encoder layers are SigLIP's, as in the original."""
        from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

        v = self.vision
        cfg = Idefics2VisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=self.num_vision_layers_used,
            num_attention_heads=v.num_attention_heads,
            num_channels=v.num_channels,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps,
            attention_dropout=v.attention_dropout,
        )
        cfg._attn_implementation = attn_implementation
        return cfg


_LLM_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
)


def _build(cls, d: dict[str, Any]):
    """Build a frozen dataclass from the keys of ``d`` it knows; other keys (model_type, ...) are ignored."""
    names = cls.__dataclass_fields__.keys()
    return cls(**{k: v for k, v in d.items() if k in names})
