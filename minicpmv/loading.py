"""Building the model and loading the original safetensors into it, full or bitsandbytes 4-bit.

We load ourselves instead of through ``PreTrainedModel.from_pretrained``: the top-level
model is a plain module (the checkpoint's own class is remote code), the tensor names are
used exactly as stored, and the 4-bit path is explicit:

* a pre-quantized ``-int4`` checkpoint (its config.json has a bitsandbytes
  ``quantization_config``): the listed linears become ``bnb.nn.Linear4bit`` and take the
  stored packed weights and quantization state as they are;
* ``quantization="nf4"`` on a full checkpoint: the same linears are quantized from the
  stored bf16 weights while loading (double quantization, bf16 compute, as the int4 repo).

The model is first built on the meta device, so no memory is spent on random weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from minicpmv.config import MiniCPMVConfig, QuantizationConfig
from minicpmv.modeling.minicpmv import MiniCPMV

logger = logging.getLogger(__name__)

QUANT_STATE_SUFFIXES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    """The checkpoint's tensors don't fit the model (missing, unexpected or misshapen)."""


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bf16 on accelerators, float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def quantized_linear_names(model: nn.Module, skip_modules: tuple[str, ...]) -> list[str]:
    """Names of the modules bitsandbytes quantizes: exactly-typed ``nn.Linear`` not matching a skip entry.

    A skip entry matches a module name that ends with it or starts with it on a module
    boundary (transformers 5.x rules; for these names the 4.x substring rule agrees).
    """
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        skipped = any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip_modules)
        if not skipped:
            names.append(name)
    return names


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"shards listed in {index.name} are missing: {absent} (incomplete download?)")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {directory} (PyTorch .bin checkpoints are not supported)"
        )
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


def load_model(
    checkpoint: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    quantization: str | None = None,
    attn_implementation: str = "sdpa",
) -> MiniCPMV:
    """Build MiniCPM-V 2.6 from a local checkpoint directory and load its weights.

    Args:
        checkpoint: a directory in the original repository layout (see ``weights.resolve_checkpoint``).
        device: where the model runs.
        dtype: activation and unquantized-weight dtype; "auto" = bf16 on GPU, float32 on CPU.
        quantization: None = as the checkpoint is; "nf4" = quantize a full checkpoint to 4-bit
            while loading. A pre-quantized checkpoint is always loaded as 4-bit.
        attn_implementation: "sdpa" or "eager" (LLM and vision tower).
    Raises:
        ConfigError, CheckpointError, ValueError.
    """
    directory = Path(checkpoint)
    device = torch.device(device)
    config = MiniCPMVConfig.from_pretrained(directory)
    dtype = parse_dtype(dtype, device)
    if quantization not in (None, "none", "nf4"):
        raise ValueError(f"unsupported quantization {quantization!r}; choose 'nf4' or None")
    prequantized = config.quantization is not None
    quant = config.quantization or (QuantizationConfig() if quantization == "nf4" else None)

    with torch.device("meta"):
        model = MiniCPMV(config, attn_implementation=attn_implementation)
    quantized = set()
    if quant is not None:
        quantized = set(quantized_linear_names(model, quant.skip_modules))
        _replace_with_linear4bit(model, quantized, quant)

    _load_state(model, checkpoint_files(directory), quantized, prequantized, quant, device, dtype)
    _rebuild_rotary(model, device)
    _check_materialized(model)
    model.eval().requires_grad_(False)
    model.quantization = quant  # type: ignore[attr-defined]
    logger.info(
        "loaded %s on %s (%s%s)",
        directory,
        device,
        dtype,
        f", {len(quantized)} linears in 4-bit" if quant else "",
    )
    return model


def _replace_with_linear4bit(model: nn.Module, names: set[str], quant: QuantizationConfig) -> None:
    import bitsandbytes as bnb

    compute_dtype = _DTYPES[quant.compute_dtype]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        with torch.device("meta"):
            new = bnb.nn.Linear4bit(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=quant.use_double_quant,
                quant_type=quant.quant_type,
                quant_storage=_DTYPES.get(quant.quant_storage, torch.uint8),
            )
        setattr(parent, child, new)


def _load_state(model, files, quantized, prequantized, quant, device, dtype) -> None:
    params = dict(model.named_parameters())
    skipped_layers = _dropped_vision_layer_prefix(model.config)
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unexpected, loaded = [], set()
    for key, tensor in iter_tensors(files):
        module_name, _, leaf = key.rpartition(".")
        quant_owner = _quant_owner(key, quantized)
        if quant_owner is not None:
            pending[quant_owner][key[len(quant_owner) + 1 :]] = tensor
            continue
        if skipped_layers and key.startswith(skipped_layers):
            continue
        if key not in params:
            unexpected.append(key)
            continue
        expected = params[key]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(expected.shape)}"
            )
        module = model.get_submodule(module_name)
        setattr(module, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(key)

    for owner, parts in pending.items():
        loaded.update(f"{owner}.{leaf}" for leaf in ("weight", "bias") if leaf in parts)
        _load_linear4bit(model.get_submodule(owner), owner, parts, prequantized, quant, device)
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match MiniCPM-V 2.6: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''} ({len(unexpected)})"
        )


def _quant_owner(key: str, quantized: set[str]) -> str | None:
    """The quantized module a tensor belongs to (its weight, bias or quantization state), if any."""
    if not quantized:
        return None
    head, sep, _ = key.partition(".weight")
    if sep and head in quantized:
        return head
    if key.endswith(".bias") and key[: -len(".bias")] in quantized:
        return key[: -len(".bias")]
    return None


def _load_linear4bit(module, name, parts, prequantized, quant, device) -> None:
    import bitsandbytes as bnb

    bias = parts.pop("bias", None)
    weight = parts.pop("weight", None)
    if weight is None:
        raise CheckpointError(f"{name}.weight is missing")
    if prequantized:
        if weight.dtype != torch.uint8:
            raise CheckpointError(f"{name}.weight: expected a packed 4-bit uint8 weight, found {weight.dtype}")
        required = {"weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant.quant_type}"}
        if quant.use_double_quant:
            required |= {"weight.nested_absmax", "weight.nested_quant_map"}
        missing, extra = sorted(required - set(parts)), sorted(set(parts) - required)
        if missing or extra:
            raise CheckpointError(
                f"{name}: 4-bit quantization state does not match the config "
                f"(missing {missing}, unexpected {extra})"
            )
        try:
            param = bnb.nn.Params4bit.from_prequantized(
                data=weight, quantized_stats=parts, requires_grad=False,
                device=device, module=module,
            )  # fmt: skip
        except (KeyError, ValueError, AssertionError, RuntimeError) as e:
            raise CheckpointError(f"{name}: unreadable 4-bit quantization state: {e!r}") from e
        if tuple(param.quant_state.shape) != (module.out_features, module.in_features):
            raise CheckpointError(
                f"{name}.weight: quantized shape {tuple(param.quant_state.shape)} does not fit the model's "
                f"{(module.out_features, module.in_features)}"
            )
        module.weight = param
    else:
        if parts:
            raise CheckpointError(
                f"{name}: unexpected quantization state in a full checkpoint: {sorted(parts)}"
            )
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise CheckpointError(
                f"{name}.weight: checkpoint shape {tuple(weight.shape)} != model "
                f"{(module.out_features, module.in_features)}"
            )
        param = bnb.nn.Params4bit(
            data=weight.to(_DTYPES[quant.compute_dtype]),
            requires_grad=False,
            blocksize=quant.blocksize,
            compress_statistics=quant.use_double_quant,
            quant_type=quant.quant_type,
            quant_storage=_DTYPES.get(quant.quant_storage, torch.uint8),
            module=module,
        )
        module.weight = param.to(device)
    if bias is not None:
        if tuple(bias.shape) != (module.out_features,):
            raise CheckpointError(
                f"{name}.bias: checkpoint shape {tuple(bias.shape)} != model ({module.out_features},)"
            )
        module.bias = nn.Parameter(
            bias.to(device=device, dtype=_DTYPES[quant.compute_dtype]), requires_grad=False
        )


def _dropped_vision_layer_prefix(config: MiniCPMVConfig) -> str | None:
    if not config.drop_vision_last_layer:
        return None
    return f"vpm.encoder.layers.{config.vision.num_hidden_layers - 1}."


def _rebuild_rotary(model: MiniCPMV, device) -> None:
    # The rotary inverse frequencies are non-persistent buffers, left empty by the meta build.
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    rotary = Qwen2RotaryEmbedding(config=model.llm.config)
    model.llm.model.rotary_emb = rotary.to(device)


def _check_materialized(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left unloaded: {left[:10]}")
