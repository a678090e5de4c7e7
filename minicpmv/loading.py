"""Building the model and loading the original safetensors into it, full or bitsandbytes 4-bit.

We load ourselves instead of through ``PreTrainedModel.from_pretrained``: the top-level
model is a plain module (the checkpoint's own class is remote code), the tensor names are
used exactly as stored, and the 4-bit path is explicit:

* a pre-quantized ``-int4`` checkpoint (its config.json has a bitsandbytes
  ``quantization_config``): the listed linears become ``bnb.nn.Linear4bit`` and take the
  stored packed weights and quantization state as they are;
* ``quantization="nf4"`` on a full checkpoint: the same linears are quantized from the
  stored bf16 weights while loading (double quantization, bf16 compute, as the int4 repo).

The model is first built on the meta device, so no memory is spent on random weights, and
then filled tensor by tensor (``build_model``; ``load_model`` feeds it a checkpoint directory).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from minicpmv.config import MiniCPMVConfig, QuantizationConfig
from minicpmv.engine.staging import device_scope
from minicpmv.modeling.minicpmv import MiniCPMV
from minicpmv.offline import import_bitsandbytes

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
# bitsandbytes' CPU repacking of a 4-bit weight (``_convert_weight_packed_for_cpu``) works on blocks of
# this many output rows.
_CPU_REPACK_BLOCK_N = 32


class CheckpointError(RuntimeError):
    """The checkpoint's tensors don't fit the model (missing, unexpected or misshapen)."""


def parse_dtype(dtype: str | torch.dtype | None, config: MiniCPMVConfig) -> torch.dtype:
    """The activation and unquantized-weight dtype that ``dtype`` asks for.

    ``None``/"auto" is the checkpoint's own dtype (config.json's ``torch_dtype``: bfloat16 for
    openbmb/MiniCPM-V-2_6) on every device, as transformers' ``dtype="auto"``; "float32",
    "bfloat16", "float16" or a ``torch.dtype`` are taken as they are.

    Why not float32 on the CPU: the full model's 8.1 billion parameters take 32.4 GB in float32 and
    16.2 GB in bf16; float32 doesn't fit a 24 GB machine. What bf16 costs on the CPU, measured on
    2026-12-05 (2-core AMD EPYC with AVX512-BF16, torch 2.13, the tiny checkpoint of
    ``devtools.tiny_checkpoint``, engine, greedy, one sequence): decoding took 8.4-11.8 ms per token in
    bf16 against 19.5-19.8 ms in float32 (medians of 7 runs of 128 tokens, two sessions), so bf16 was
    faster there (CPUs without native bf16 were not measured). The logits of an 80-token prompt with
    one image chunk differed by at most 0.15 (float32 logits up to 4.17 in magnitude; relative L2
    error 2.0%; the top token agreed at 76 of 80 positions). Where float32 exactness matters (the
    golden parity tests, which compare with the original's float32 numbers) ask for "float32".

    Raises:
        ValueError: an unsupported ``dtype``, or "auto" with a checkpoint dtype outside those three.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if config.torch_dtype not in _DTYPES:
            raise ValueError(
                f"dtype 'auto': the checkpoint's torch_dtype {config.torch_dtype!r} is not one of "
                f"{sorted(_DTYPES)}; pass a dtype"
            )
        return _DTYPES[config.torch_dtype]
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
        device, dtype, quantization, attn_implementation: as ``build_model``'s.
    Raises:
        ConfigError, CheckpointError, ValueError.
    """
    directory = Path(checkpoint)
    config = MiniCPMVConfig.from_pretrained(directory)
    logger.info("loading %s", directory)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        # A generator, so the files are looked up only once build_model has checked its arguments.
        yield from iter_tensors(checkpoint_files(directory))

    return build_model(
        config, tensors(), device=device, dtype=dtype, quantization=quantization,
        attn_implementation=attn_implementation,
    )  # fmt: skip


def build_model(
    config: MiniCPMVConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    quantization: str | None = None,
    attn_implementation: str = "sdpa",
) -> MiniCPMV:
    """Build MiniCPM-V 2.6 on the meta device and fill it from ``(name, tensor)`` pairs.

    The names are the original checkpoint's (those of ``model.safetensors.index.json``; for a
    pre-quantized config, the packed weights and their quantization state). ``tensors`` is consumed
    once, one pair at a time; nothing keeps a pair longer than needed (a 4-bit linear's pieces until
    it is complete), so a caller can generate full-size weights one by one without holding them all.
    Tensors may be on any device and in any floating dtype; they are moved and cast here.

    Memory: full-precision loads keep a tensor as it is when it is already on ``device`` in ``dtype``
    (for safetensors on the CPU: a view of the memory-mapped file). 4-bit loads never keep a view of
    a file or of a larger buffer: every tensor the model keeps owns its memory (see ``_owned``).

    Args:
        config: the model's configuration; ``config.quantization`` set means a pre-quantized checkpoint.
        tensors: ``(name, tensor)`` pairs, each name once.
        device: where the model runs.
        dtype: activation and unquantized-weight dtype; "auto" = the checkpoint's (``parse_dtype``).
        quantization: None = as the tensors are; "nf4" = quantize the linears to 4-bit on ``device``
            while loading. A pre-quantized config is always loaded as 4-bit.
        attn_implementation: "sdpa" or "eager" (LLM and vision tower).
    Raises:
        CheckpointError: tensors missing, unexpected or misshapen; ValueError: bad arguments.
    """
    device = torch.device(device)
    dtype = parse_dtype(dtype, config)
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

    # With the target GPU current: bitsandbytes' quantization and anything else that names no device work there
    # (an instance on GPU 3 creates no context on GPU 0).
    with device_scope(device):
        _load_state(model, tensors, quantized, prequantized, quant, device, dtype)
        _rebuild_rotary(model, device)
    _check_materialized(model)
    if quantized:
        _keep_cpu_repacking_where_supported(model)
    model.eval().requires_grad_(False)
    model.quantization = quant  # type: ignore[attr-defined]
    logger.info(
        "built %s on %s (%s%s)",
        config.name_or_path or "MiniCPM-V 2.6",
        device,
        dtype,
        f", {len(quantized)} linears in 4-bit" if quant else "",
    )
    return model


def _replace_with_linear4bit(model: nn.Module, names: set[str], quant: QuantizationConfig) -> None:
    bnb = import_bitsandbytes()

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


def _load_state(model, tensors, quantized, prequantized, quant, device, dtype) -> None:
    params = dict(model.named_parameters())
    skipped_layers = _dropped_vision_layer_prefix(model.config)
    # The pieces each 4-bit linear waits for; it is loaded (and its pieces dropped) once they are all in.
    waiting = {name: _linear4bit_pieces(model.get_submodule(name), prequantized, quant) for name in quantized}
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unexpected, loaded = [], set()

    def load_linear4bit(owner: str) -> None:
        parts = pending.pop(owner)
        loaded.update(f"{owner}.{leaf}" for leaf in ("weight", "bias") if leaf in parts)
        _load_linear4bit(model.get_submodule(owner), owner, parts, prequantized, quant, device)

    for key, tensor in tensors:
        module_name, _, leaf = key.rpartition(".")
        quant_owner = _quant_owner(key, quantized)
        if quant_owner is not None:
            if quant_owner not in waiting:  # already loaded: this piece is one too many
                unexpected.append(key)
                continue
            pending[quant_owner][key[len(quant_owner) + 1 :]] = tensor
            if waiting[quant_owner] <= pending[quant_owner].keys():
                del waiting[quant_owner]
                load_linear4bit(quant_owner)
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
        value = tensor.to(device=device, dtype=dtype)
        # In a full-precision load, a tensor already on the device in the dtype is kept as it is: for
        # safetensors on the CPU, a view of the memory-mapped file, which loads at once and whose pages
        # are file-backed (the kernel can drop and re-read them under memory pressure). A 4-bit load keeps
        # only a small part of the checkpoint, and one view would keep the whole file mapped and resident.
        if quant is not None:
            value = _owned(value, tensor)
        module = model.get_submodule(module_name)
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        loaded.add(key)

    for owner in list(pending):  # incomplete 4-bit linears: _load_linear4bit names what is wrong
        load_linear4bit(owner)
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match MiniCPM-V 2.6: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''} ({len(unexpected)})"
        )


def _owned(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value``, copied if it is ``source``'s memory and that memory is not a tensor of its own.

    ``Tensor.to`` returns its input when there is nothing to do. Safetensors' tensors on the CPU are
    windows onto the memory-mapped file (storage not allocated by torch, hence not resizable): keeping
    one keeps the whole file mapped. A view into a larger tensor would keep all of it. A tensor that
    torch allocated at exactly its size (e.g. generated by the caller on a GPU) is kept without a copy.
    """
    storage = value.untyped_storage()
    if storage.data_ptr() != source.untyped_storage().data_ptr():
        return value
    if storage.resizable() and storage.nbytes() == value.numel() * value.element_size():
        return value
    return value.clone()


def _linear4bit_pieces(module, prequantized: bool, quant: QuantizationConfig) -> set[str]:
    """The tensor names, relative to the module, that a complete 4-bit linear of this load has."""
    pieces = {"weight"}
    if prequantized:
        pieces |= {"weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant.quant_type}"}
        if quant.use_double_quant:
            pieces |= {"weight.nested_absmax", "weight.nested_quant_map"}
    if module.bias is not None:
        pieces.add("bias")
    return pieces


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
    """Fill one ``Linear4bit`` from its checkpoint tensors; every tensor it keeps owns its memory."""
    bnb = import_bitsandbytes()

    bias = parts.pop("bias", None)
    weight = parts.pop("weight", None)
    if weight is None:
        raise CheckpointError(f"{name}.weight is missing")
    if prequantized:
        if weight.dtype != torch.uint8:
            raise CheckpointError(f"{name}.weight: expected a packed 4-bit uint8 weight, found {weight.dtype}")
        required = _linear4bit_pieces(module, prequantized, quant) - {"weight", "bias"}
        missing, extra = sorted(required - set(parts)), sorted(set(parts) - required)
        if missing or extra:
            raise CheckpointError(
                f"{name}: 4-bit quantization state does not match the config "
                f"(missing {missing}, unexpected {extra})"
            )
        # from_prequantized keeps what ``.to(device)`` gives it, which on the CPU is the tensor itself.
        weight = _owned(weight.to(device), weight)
        parts = {k: _owned(v.to(device), v) for k, v in parts.items()}
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
        # Quantizing writes new tensors on ``device``; the source weight is dropped with ``parts``.
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
        value = bias.to(device=device, dtype=_DTYPES[quant.compute_dtype])
        module.bias = nn.Parameter(_owned(value, bias), requires_grad=False)


def _keep_cpu_repacking_where_supported(model: nn.Module) -> None:
    """Turn bitsandbytes' CPU repacking off for the 4-bit linears whose sizes it can't handle.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` repacks the weight for a
    faster CPU kernel at its first CPU forward, when ``module.support_avx512bf16_for_cpu`` (set in
    ``__init__`` from the CPU's features) is true. The repacking needs out_features % 32 == 0 (blocks
    of 32 rows) and in_features % blocksize == 0 (it reshapes absmax to [out, in / blocksize]); the
    vision MLP's 4304 fails both (fc1: "N must be divisible by block_n", fc2: a reshape error), so
    every image request would fail. Those linears take bitsandbytes' generic path (dequantize, then
    matmul), as on CPUs without AVX512-BF16; all others keep the fast kernel. Set on every device:
    the flag only matters for CPU inputs, and a model moved to the CPU later needs it too.
    """
    bnb = import_bitsandbytes()

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        blocksize = module.weight.quant_state.blocksize
        if module.out_features % _CPU_REPACK_BLOCK_N or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False


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
