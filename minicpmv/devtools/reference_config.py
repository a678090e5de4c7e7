"""config.json of openbmb/MiniCPM-V-2_6 (key order as published) and the tiny variants we test with.

The real values let us build the full-size architecture on the meta device (parameter
count checks) or with random weights on a GPU (timings), without any download.
"""

from __future__ import annotations

import copy
from typing import Any

FULL_CONFIG: dict[str, Any] = {
    "_name_or_path": "openbmb/MiniCPM-V-2_6",
    "version": 2.6,
    "architectures": ["MiniCPMV"],
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
    "model_type": "minicpmv",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0",
    "use_cache": True,
    "vocab_size": 151666,
    "batch_vision_input": True,
    "drop_vision_last_layer": False,
    "image_size": 448,
    "patch_size": 14,
    "query_num": 64,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
    "slice_mode": True,
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "siglip",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}

# The tiny sizes of the golden reference checkpoint: every structural feature of the real
# model (GQA, 2 resampler heads of 128, the 70x70 position grid, 64 queries, the full vocab).
TINY_OVERRIDES: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
}
TINY_VISION_OVERRIDES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}

# Real sizes that kernels can trip over, kept by ``tiny_config(awkward=True)``. The vision MLP's 4304
# (= 16 * 269) divides neither by 32 nor by 64: bitsandbytes' CPU repacking of 4-bit weights needs
# out_features % 32 == 0 and in_features % blocksize (64) == 0, so fc1 (1152 -> 4304) and fc2
# (4304 -> 1152) both fail it. Every other quantized linear of the full model has multiples of 64.
AWKWARD_VISION_OVERRIDES: dict[str, Any] = {
    "intermediate_size": FULL_CONFIG["vision_config"]["intermediate_size"],
}

GENERATION_CONFIG: dict[str, Any] = {
    "_from_model_config": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "transformers_version": "4.43.3",
}

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "auto_map": {
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
    },
    "processor_class": "MiniCPMVProcessor",
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "use_image_id": True,
    "image_feature_size": 64,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "im_id_start": "<image_id>",
    "im_id_end": "</image_id>",
    "slice_mode": True,
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
    "version": 2.6,
}


def full_config() -> dict[str, Any]:
    return copy.deepcopy(FULL_CONFIG)


def tiny_config(awkward: bool = False) -> dict[str, Any]:
    """The tiny config; ``awkward=True`` keeps the real sizes in ``AWKWARD_VISION_OVERRIDES``.

    The awkward variant is still small (the vision MLP is 64 x 4304) and has, per layer, exactly the
    linears of the full model whose sizes some kernels can't handle (tests/unit/test_loading_cpu.py).
    """
    cfg = full_config()
    cfg.update(TINY_OVERRIDES)
    cfg["vision_config"].update(TINY_VISION_OVERRIDES)
    if awkward:
        cfg["vision_config"].update(AWKWARD_VISION_OVERRIDES)
    cfg["use_image_id"] = True
    return cfg
