"""Write a random-weight MiniCPM-V 2.6 checkpoint of the true architecture at tiny size.

The files follow the original repositories' layout (config.json with the real keys,
sharded safetensors with the original tensor names and an index, tokenizer files with the
real special tokens at their real ids, generation and preprocessor configs), so a tiny
checkpoint goes through exactly the loading path of a real one. With ``int4=True`` the
linears are quantized to bitsandbytes nf4 (double quantization, bf16 compute) and saved
pre-quantized, in the layout of ``openbmb/MiniCPM-V-2_6-int4``.

The tokenizer is MiniCPM-V 2.6's (the Qwen2 vocabulary and the real added tokens, see
``tiny_tokenizer``); the embedding and lm_head rows of all its ids are random, so every id of the
151,666-row vocabulary can be generated, whole words and pieces of a UTF-8 character alike.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from minicpmv.config import MiniCPMVConfig, QuantizationConfig
from minicpmv.devtools.reference_config import GENERATION_CONFIG, PREPROCESSOR_CONFIG, tiny_config
from minicpmv.devtools.tiny_tokenizer import write_tiny_tokenizer
from minicpmv.modeling.minicpmv import MiniCPMV

NUM_SHARDS = 2


def _init_weights(model: MiniCPMV, live_ids: torch.Tensor, seed: int) -> None:
    """Seeded draws whose scale keeps activations O(1) and attention input-dependent."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    for name, param in sorted(model.named_parameters()):
        shape = param.shape
        owner = name.split(".")[-2] if "." in name else ""
        is_norm = "norm" in owner or owner.startswith("ln_")
        if is_norm and name.endswith("weight"):
            value = normal(shape, 0.1, 1.0)
        elif name.endswith("bias"):
            value = normal(shape, 0.1)
        elif name.endswith("embed_tokens.weight"):
            value = torch.zeros(shape)
            value[live_ids] = normal((len(live_ids), shape[1]), 0.25)
        elif name.endswith("lm_head.weight"):
            value = torch.zeros(shape)
            value[live_ids] = normal((len(live_ids), shape[1]), shape[1] ** -0.5)
        elif name.endswith("position_embedding.weight"):
            value = normal(shape, 0.5)
        elif name == "resampler.query":
            value = normal(shape, 0.02)
        elif name == "resampler.attn.in_proj_weight":
            d = shape[1]
            value = torch.cat([normal((d, d), 0.15), normal((d, d), 0.15), normal((d, d), d**-0.5)])
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            std = fan_in**-0.5
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                std = 0.3 if name.startswith("vpm.") else 0.1
            value = normal(shape, std)
        with torch.no_grad():
            param.copy_(value.to(torch.bfloat16).to(param.dtype))


def _save_sharded(state: dict[str, torch.Tensor], out_dir: Path, num_shards: int = NUM_SHARDS) -> None:
    """safetensors shards ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    keys = sorted(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    budget = total / num_shards
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > budget and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {k: state[k].contiguous() for k in shard}, str(out_dir / filename), metadata={"format": "pt"}
        )
        weight_map.update({k: filename for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# The weights openbmb/MiniCPM-V-2_6-int4 stores in nf4 (MODEL_FACTS §2.4: every LLM layer linear, the vision
# encoder's q/k/v and MLP linears; not out_proj, kv_proj, lm_head, the resampler), stated here independently of
# the loader's rule (loading.quantized_linear_names), so the int4 checkpoint tests the loader, not its echo.
INT4_QUANTIZED = re.compile(r"(llm\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                            r"|vpm\.encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.fc[12]))\.weight")


def write_tiny_checkpoint(out_dir: str | Path, *, int4: bool = False, seed: int = 0) -> Path:
    """Write a tiny checkpoint into ``out_dir`` (created if needed) and return its path.

    The same ``seed`` gives the same full-precision weights, so ``int4=True`` quantizes
    exactly the weights that ``int4=False`` writes.
    """
    from minicpmv.tokenizer import load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out)
    tokenizer = load_tokenizer(out)
    live_ids = torch.tensor(sorted(tokenizer.get_vocab().values()), dtype=torch.long)

    config_dict = tiny_config()
    config = MiniCPMVConfig.from_dict(config_dict)
    model = MiniCPMV(config, attn_implementation="eager")
    _init_weights(model, live_ids, seed)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}

    if int4:  # quantized with bitsandbytes directly, never through our loader (the loader is what it tests)
        from minicpmv.devtools.random_weights import quantize_linears

        modules = {name.removesuffix(".weight") for name in state if INT4_QUANTIZED.fullmatch(name)}
        state = dict(quantize_linears(iter(state.items()), modules, QuantizationConfig()))
        config_dict["_name_or_path"] = "openbmb/MiniCPM-V-2_6-int4"
        config_dict["quantization_config"] = QuantizationConfig().to_dict()

    _write_json(out / "config.json", config_dict)
    _save_sharded(state, out)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    return out
