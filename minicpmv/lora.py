"""Fine-tuned adapters as MiniCPM-V's own recipe writes them (``finetune/finetune_lora.sh``), read without
remote code and checked against the base model before anything is used.

An adapter directory holds:

* ``adapter_config.json`` and ``adapter_model.safetensors``: a PEFT LoRA (``peft_type`` LORA) on any of the
  LLM's linear layers, ``llm.model.layers.<i>.self_attn.{q,k,v,o}_proj`` and ``...mlp.{gate,up,down}_proj``
  (the recipe's default targets are the attention projections). Keys as PEFT saves them:
  ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``. Scaling
  ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
  per module are honoured. DoRA, biases, ``modules_to_save`` and LoRA on other modules are refused.
* optionally ``vpm_resampler_embedtokens.pt`` (or a ``.safetensors`` of the same name): with ``--tune_vision
  true`` the recipe trains the vision tower in full and saves it with the resampler and the token embeddings;
  the official inference code loads it over the base model with ``load_state_dict(strict=False)``. It is a
  pickle: read with ``torch.load(weights_only=True)`` only (tensors, nothing executable), every key must be a
  parameter of ``vpm``, ``resampler`` or ``llm.model.embed_tokens`` with the base's shape.

Nothing here touches a device: tensors stay on the CPU (``LoRAAdapter``), the engine puts them where they go.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
VISION_FILES = ("vpm_resampler_embedtokens.safetensors", "vpm_resampler_embedtokens.pt")
# The LLM's linear layers an adapter may target, as module paths of the base model.
TARGET = re.compile(r"llm\.model\.layers\.(\d+)\."
                    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
VISION_PREFIXES = ("vpm.", "resampler.", "llm.model.embed_tokens.")
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The adapter can't be used with this base model; the message says what is wrong (a 400 at load)."""


@dataclass
class LoRAAdapter:
    """One adapter, on the CPU. ``weights``: per target module (``layers.<i>.<name>``, e.g. ``layers.3.q_proj``),
    ``(A [r, in], B [out, r] already multiplied by its scaling)``; ``vision``: the vision file's tensors by the
    base model's parameter names (empty: the base's vision tower, resampler and embeddings)."""

    name: str
    path: Path
    rank: int  # the largest rank of its modules
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def has_vision(self) -> bool:
        return any(not k.startswith("llm.") for k in self.vision)

    @property
    def has_embeddings(self) -> bool:
        return "llm.model.embed_tokens.weight" in self.vision

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.weights.values() for t in pair] + list(self.vision.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def module_key(layer: int, name: str) -> str:
    return f"layers.{layer}.{name}"


def load_adapter(name: str, path: str | Path, base: torch.nn.Module, max_rank: int) -> LoRAAdapter:
    """Read and check the adapter at ``path`` against ``base`` (a MiniCPMV); raises AdapterError."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    config = _config(name, path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        others = sorted(p.name for p in path.glob("adapter_model.*"))
        found = f" (found {', '.join(others)}: only safetensors are read)" if others else ""
        raise AdapterError(f"adapter {name!r}: no {WEIGHTS_FILE} in {path}{found}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # noqa: BLE001 (a damaged file: say so)
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} can't be read ({type(e).__name__}: {e})") from e
    modules = dict(base.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, kind = _split_key(name, key)
        if TARGET.fullmatch(module) is None:
            raise AdapterError(f"adapter {name!r}: LoRA on {module!r}; only the LLM's linear layers (llm.model."
                               "layers.<i>.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj) are served")  # fmt: skip
        if module not in modules:
            raise AdapterError(f"adapter {name!r}: the base model has no module {module!r}")
        pairs.setdefault(module, {})[kind] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    weights, rank = {}, 0
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"adapter {name!r}: {module} has {sorted(pair)}, expected lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        linear = modules[module]
        in_features, out_features = linear.in_features, linear.out_features
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, r):
            raise AdapterError(f"adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                               f"this base model needs [r, {in_features}] and [{out_features}, r]")  # fmt: skip
        if r > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {r} at {module} is above this server's max_lora_rank "
                               f"{max_rank}")  # fmt: skip
        match = TARGET.fullmatch(module)
        short = module_key(int(match.group(1)), match.group(2).split(".")[1])
        weights[short] = (a.float().contiguous(), (b.float() * _scaling(config, module, r)).contiguous())
        rank = max(rank, r)
    vision = _vision(name, path, base)
    return LoRAAdapter(name=name, path=path, rank=rank, weights=weights, vision=vision)


def _config(name: str, path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"adapter {name!r}: no {CONFIG_FILE} in {path}")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r}; only LORA adapters are served")
    for key, allowed, what in (("use_dora", (False, None), "DoRA"), ("bias", ("none", None), "LoRA biases"),
                               ("modules_to_save", (None, []), "modules_to_save"),
                               ("fan_in_fan_out", (False, None), "fan_in_fan_out")):  # fmt: skip
        if config.get(key) not in allowed:
            raise AdapterError(f"adapter {name!r}: {what} ({key}: {config.get(key)!r}) is not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"adapter {name!r}: {key} must be a positive number, got {value!r}")
    return config


def _scaling(config: dict, module: str, r: int) -> float:
    """PEFT's: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), alpha from ``alpha_pattern`` where a key matches."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _split_key(name: str, key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "lora_A")."""
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
    if match is None:
        raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} in {WEIGHTS_FILE} (LoRA A/B weights only)")
    return match.group(1), match.group(2)


def _vision(name: str, path: Path, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    found = [path / f for f in VISION_FILES if (path / f).is_file()]
    if not found:
        return {}
    file = found[0]
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            # weights_only: tensors and plain containers only; anything executable in the pickle is refused.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a pickle with code in it lands here too)
        raise AdapterError(f"adapter {name!r}: {file.name} can't be read as tensors only ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]})") from e  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):  # fmt: skip
        raise AdapterError(f"adapter {name!r}: {file.name} must map parameter names to tensors")
    expected = dict(base.named_parameters())
    vision = {}
    for key, tensor in state.items():
        key = key.removeprefix(_PEFT_PREFIX)
        if not key.startswith(VISION_PREFIXES):
            raise AdapterError(f"adapter {name!r}: {file.name} has {key!r}; it may hold only vpm.*, resampler.* and "
                               "llm.model.embed_tokens.weight")  # fmt: skip
        if key not in expected:
            raise AdapterError(f"adapter {name!r}: {file.name} has {key!r}, which the base model does not have")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterError(f"adapter {name!r}: {file.name}: {key} is {tuple(tensor.shape)}, the base model's "
                               f"{tuple(expected[key].shape)}")  # fmt: skip
        vision[key] = tensor
    return vision
