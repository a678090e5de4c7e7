"""Random-weight MiniCPM-V 2.6 checkpoints of any size, written shard by shard.

For timings and memory checks without a download: ``reference_config.full_config()`` gives the real
architecture (8.1 B parameters, ~16 GB of bf16), any other config.json dict a smaller one. The weights are
noise, but of the right names, shapes and dtypes, in the original repositories' file layout, so the
checkpoint goes through exactly the loading path of a real one:

* :func:`random_tensors` yields the bf16 tensors one at a time;
* :func:`write_random_checkpoint` writes them as ``openbmb/MiniCPM-V-2_6`` (bf16) or, quantizing each
  linear as it comes, as ``openbmb/MiniCPM-V-2_6-int4`` (bitsandbytes nf4, pre-quantized), holding about one
  shard in memory at a time (not the whole model).

Unlike ``tiny_checkpoint`` (fixed tiny size, scales tuned so the golden tests see input-dependent
attention), the weights here follow one plain rule, which keeps activations O(1) at any size.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minicpmv.config import MiniCPMVConfig, QuantizationConfig
from minicpmv.devtools.reference_config import GENERATION_CONFIG, PREPROCESSOR_CONFIG
from minicpmv.devtools.tiny_tokenizer import write_tiny_tokenizer
from minicpmv.modeling.minicpmv import MiniCPMV

INT4_NAME_OR_PATH = "openbmb/MiniCPM-V-2_6-int4"
_PARTIAL_SUFFIX = ".safetensors.partial"
_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")


def _meta_model(config: dict[str, Any]) -> MiniCPMV:
    """The architecture of ``config`` on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return MiniCPMV(MiniCPMVConfig.from_dict(config))


def _tensor_seed(seed: int, name: str) -> int:
    # One generator per tensor, seeded from (seed, name): a tensor's values depend neither on the order
    # of the others nor on which rows of the embeddings are drawn. 32 bits: the CPU generator (mt19937)
    # ignores the upper half of a 64-bit seed.
    return zlib.crc32(f"{seed}/{name}".encode())


def random_tensors(
    config: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    live_ids: torch.Tensor | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The bf16 tensors of a random-weight MiniCPM-V 2.6, one at a time.

    Args:
        config: a config.json dict (e.g. ``reference_config.full_config()``).
        device: where each tensor is drawn and returned.
        seed: the same seed on the same device gives the same tensors. Each tensor has a generator of its
            own, seeded from ``seed`` and its name, so its values depend neither on ``live_ids`` nor on the
            other tensors.
        live_ids: token ids (1-D integer tensor) whose ``embed_tokens`` / ``lm_head`` rows are drawn; the
            other rows are zero (so those ids get logit exactly 0). None: every row is drawn.
    Yields:
        ``(name, tensor)`` in ``MiniCPMV(...).state_dict()`` order and names (those of the original
        checkpoint), each a new contiguous bf16 tensor of the model's shape on ``device``. Normalization
        weights are 1, biases 0, every other tensor N(0, 1/fan_in) with fan_in = the product of all but the
        first dimension. The caller holds only what it keeps: one tensor is alive at a time here.
    """
    model = _meta_model(config)
    norms = {name for name, module in model.named_modules() if type(module).__name__.endswith("Norm")}
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    del model
    if live_ids is not None:
        live_ids = live_ids.to(device=device, dtype=torch.long)
    generator = torch.Generator(device=device)
    for name, shape in shapes.items():
        # Yielded without a local name, so that this frame does not keep a tensor alive past its turn.
        yield name, _draw(name, shape, name.rpartition(".")[0] in norms, generator, seed, device, live_ids)


def _draw(
    name: str,
    shape: torch.Size,
    is_norm: bool,
    generator: torch.Generator,
    seed: int,
    device: str | torch.device,
    live_ids: torch.Tensor | None,
) -> torch.Tensor:
    """One tensor of :func:`random_tensors` (its rules)."""
    leaf = name.rpartition(".")[2]
    if is_norm and leaf == "weight":
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    if leaf.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    generator.manual_seed(_tensor_seed(seed, name))
    std = math.prod(shape[1:]) ** -0.5
    if live_ids is not None and name.endswith(_VOCAB_ROWS):
        value = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        rows = torch.empty((len(live_ids), *shape[1:]), dtype=torch.bfloat16, device=device)
        value[live_ids] = rows.normal_(0.0, std, generator=generator)
        return value
    # Drawn in bf16 directly: no float32 copy of the largest tensors (the vocab ones at full size).
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=generator)


def quantize_linears(
    tensors: Iterator[tuple[str, torch.Tensor]], quantized: set[str], quant: QuantizationConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with the weight of each module in ``quantized`` replaced by its bitsandbytes 4-bit form.

    A quantized ``<module>.weight`` becomes the tensors a pre-quantized checkpoint stores (what
    ``bnb.nn.Linear4bit.state_dict()`` holds): ``<module>.weight`` (packed uint8) and
    ``<module>.weight.<key>`` for each entry of ``QuantState.as_dict(packed=True)``; the rest passes as is.
    """
    from minicpmv.offline import import_bitsandbytes

    bnb_functional = import_bitsandbytes().functional

    storage = getattr(torch, quant.quant_storage)
    for name, tensor in tensors:
        owner = name.removesuffix(".weight")
        if owner == name or owner not in quantized:
            yield name, tensor
            del tensor  # not kept alive while the next one is drawn
            continue
        packed, state = bnb_functional.quantize_4bit(
            tensor,
            blocksize=quant.blocksize,
            compress_statistics=quant.use_double_quant,
            quant_type=quant.quant_type,
            quant_storage=storage,
        )
        del tensor
        yield name, packed
        for key, value in state.as_dict(packed=True).items():
            # Cloned: bitsandbytes may share a code book between states, and safetensors refuses to save
            # tensors that share memory.
            yield f"{name}.{key}", value.clone()


def _write_shards(
    out: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int
) -> tuple[dict[str, str], int]:
    """Save ``tensors`` into safetensors shards of at most ``shard_bytes`` (or one tensor, if larger).

    A shard is saved and dropped before the tensor that would overflow it is added, so at most one shard
    plus one tensor is held on the CPU. The shards are first saved under temporary names (their count is
    only known at the end) and renamed to ``model-0000k-of-0000n.safetensors`` once all are written; on
    an error the partial files are removed. Returns the weight map (tensor name -> file name) and the total
    size of the tensors in bytes.
    """
    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def save() -> None:
        part = out / f"model-{len(parts) + 1:05d}{_PARTIAL_SUFFIX}"
        parts.append((part, list(shard)))  # before saving, so that a half-written file is cleaned up too
        save_file(shard, str(part), metadata={"format": "pt"})

    try:
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                save()
                shard, size = {}, 0
            shard[name] = tensor.to("cpu").contiguous()
            del tensor
            size += nbytes
            total += nbytes
        if shard or not parts:
            save()
        shard = {}
    except BaseException:
        for part, _ in parts:
            part.unlink(missing_ok=True)
        raise
    weight_map = {}
    for k, (part, names) in enumerate(parts, start=1):
        filename = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
        part.replace(out / filename)
        weight_map.update(dict.fromkeys(names, filename))
    return weight_map, total


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_random_checkpoint(
    out: Path | str,
    config: dict[str, Any],
    *,
    int4: bool = False,
    device: str = "cpu",
    shard_bytes: int = 2 << 30,
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint of ``config`` into ``out`` (created if needed) and return ``out``.

    The layout is the original repository's: config.json, ``model-0000k-of-0000n.safetensors`` shards of at
    most ``shard_bytes`` bytes each (a single larger tensor gets a shard of its own),
    model.safetensors.index.json (weight map and ``total_size``, the tensors' bytes), generation_config.json,
    preprocessor_config.json and the tiny tokenizer (``tiny_tokenizer``). The weights are those of
    :func:`random_tensors` (``device``, ``seed``) with ``live_ids`` = the tiny tokenizer's ids, so that
    generated tokens decode to text.

    ``int4=True`` writes the layout of ``openbmb/MiniCPM-V-2_6-int4`` instead: the linears that bitsandbytes
    quantizes (``loading.quantized_linear_names`` with ``QuantizationConfig().skip_modules``) are quantized
    on ``device`` to nf4 as ``QuantizationConfig()`` says (blocksize 64, double quantization, uint8 storage)
    and stored pre-quantized; config.json gets that ``quantization_config``. The quantized weights are the
    bf16 ones of the same seed, rounded.

    Memory: about one shard plus one tensor on the CPU (two shards with safetensors < 0.8, which copies
    the shard while saving), and one tensor on ``device``. Files of the same names in ``out`` are replaced;
    config.json and the index are written last, so an interrupted run leaves no loadable checkpoint.
    """
    from minicpmv.loading import quantized_linear_names
    from minicpmv.tokenizer import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out)
    live_ids = torch.tensor(sorted(load_tokenizer(out).get_vocab().values()), dtype=torch.long)
    tensors = random_tensors(config, device=device, seed=seed, live_ids=live_ids)
    config = dict(config)
    if int4:
        quant = QuantizationConfig()
        quantized = set(quantized_linear_names(_meta_model(config), quant.skip_modules))
        tensors = quantize_linears(tensors, quantized, quant)
        config["_name_or_path"] = INT4_NAME_OR_PATH
        config["quantization_config"] = quant.to_dict()
    weight_map, total = _write_shards(out, tensors, shard_bytes)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", config)
    return out
