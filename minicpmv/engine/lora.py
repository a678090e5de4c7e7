"""LoRA adapters in the engine: device slots, which sequence uses which, and the low-rank term of each layer.

``max_loras`` adapters are resident at once, each in a **slot** of per-layer device stacks (``LoRAStacks``):
for every target linear layer, ``A [S * R, in]`` and ``B [out, S * R]`` where slot ``s`` owns columns
``s * R ... (s + 1) * R - 1`` (``R`` = ``max_lora_rank``; an adapter of lower rank leaves zeros, B carries its
scaling). A step's LoRA term for a layer is then two matmuls over all slots with a row mask:
``delta = ((x @ A^T) * mask) @ B^T``, ``mask[t, c] = 1`` where column ``c`` belongs to row ``t``'s slot, so
rows of different adapters (and rows of none: all zeros) are computed together, with shapes that depend only on
the step's token count (CUDA graphs capture it) and ``S * R`` extra columns per layer (4 x 64 = 256 beside
Qwen2-7B's 3,584). Exact: every row gets only its own adapter's product.

``LoRAManager`` (engine thread) keeps the registered adapters on the host (``minicpmv/lora.py`` reads and checks
them), puts one in a slot when a sequence of it is admitted (the least recently used free slot; an adapter in
use by a running sequence is never evicted), and counts references; a sequence whose adapter can't get a slot
waits in the queue while others are admitted. An adapter with its own vision tower, resampler or token
embeddings (the recipe's ``vpm_resampler_embedtokens``) gets device copies of those while resident.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minicpmv.lora import AdapterError, LoRAAdapter, load_adapter, module_key

logger = logging.getLogger(__name__)

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = (*ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj")


def parse_targets(text: str) -> tuple[str, ...]:
    """``lora_target_modules``: "attention" (q/k/v/o, the recipe's), "all" (+ gate/up/down) or a comma list."""
    text = text.strip()
    if text in ("attention", ""):
        return ATTENTION_TARGETS
    if text == "all":
        return ALL_TARGETS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"lora_target_modules: unknown {unknown}; use attention, all, or of {', '.join(ALL_TARGETS)}")
    return names


def parse_modules(text: str | None) -> dict[str, str]:
    """``lora_modules``: "name=path,name2=path2" (vLLM's ``--lora-modules`` spelling) -> {name: path}."""
    modules: dict[str, str] = {}
    for item in (text or "").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"lora_modules: {item!r} is not name=path")
        if name.strip() in modules:
            raise ValueError(f"lora_modules: {name.strip()!r} is given twice")
        modules[name.strip()] = path.strip()
    return modules


class LoRAStacks:
    """The device stacks of ``slots`` adapters of rank up to ``rank`` for the ``targets`` of every layer."""

    def __init__(self, model, slots: int, rank: int, targets: tuple[str, ...], device, dtype):
        self.slots, self.rank, self.targets = slots, rank, targets
        self.device, self.dtype = torch.device(device), dtype
        layers = model.llm.model.layers
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(layers):
            for name in targets:
                linear = _linear(layer, name)
                key = module_key(index, name)
                self.a[key] = torch.zeros(slots * rank, linear.in_features, device=self.device, dtype=dtype)
                self.b[key] = torch.zeros(linear.out_features, slots * rank, device=self.device, dtype=dtype)
        self._column_slot = torch.arange(slots * rank, device=self.device) // rank

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put ``adapter``'s weights into ``slot`` (zeros where it has no module or a lower rank)."""
        columns = slice(slot * self.rank, (slot + 1) * self.rank)
        for key in self.a:
            self.a[key][columns].zero_()
            self.b[key][:, columns].zero_()
            pair = adapter.weights.get(key)
            if pair is not None:
                a, b = pair
                r = a.shape[0]
                self.a[key][slot * self.rank : slot * self.rank + r].copy_(a)
                self.b[key][:, slot * self.rank : slot * self.rank + r].copy_(b)

    def mask(self, row_slots: torch.Tensor) -> torch.Tensor:
        """[T, S * R] in the model dtype: 1 where a column belongs to the row's slot (-1: a row of no adapter)."""
        return (self._column_slot[None, :] == row_slots[:, None]).to(self.dtype)

    def delta(self, key: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The LoRA term of layer-module ``key`` for the rows of ``x`` [T, in]: [T, out]."""
        return ((x @ self.a[key].T) * mask) @ self.b[key].T


def _linear(layer, name: str):
    return getattr(layer.self_attn if name in ATTENTION_TARGETS else layer.mlp, name)


class AdapterVision(nn.Module):
    """An adapter's own vision tower and resampler (copies of the base's with its weights), encoding images as
    ``MiniCPMV.encode_images`` does."""

    def __init__(self, model, state: dict[str, torch.Tensor]):
        super().__init__()
        self.config = model.config
        self.vpm = copy.deepcopy(model.vpm)
        self.resampler = copy.deepcopy(model.resampler)
        own = {k: v for k, v in state.items() if k.startswith(("vpm.", "resampler."))}
        for module in (self.vpm, self.resampler):
            for sub in module.modules():
                if type(sub).__module__.startswith("bitsandbytes"):
                    raise AdapterError("an adapter with its own vision tower is not served over a 4-bit base yet")
        missing = self.load_state_dict(own, strict=False)
        if missing.unexpected_keys:
            raise AdapterError(f"unexpected vision weights: {missing.unexpected_keys[:5]}")

    @property
    def device(self) -> torch.device:
        return self.resampler.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.resampler.query.dtype

    def encode_images(self, pixel_values, tgt_sizes):
        from minicpmv.modeling.minicpmv import MiniCPMV

        return MiniCPMV.encode_images(self, pixel_values, tgt_sizes)


@dataclass
class Registered:
    adapter: LoRAAdapter
    uid: int  # changes when a name is loaded again: caches keyed by it never mix two versions
    slot: int | None = None
    vision: AdapterVision | None = None
    embeddings: torch.Tensor | None = None  # [V, D] on the device while resident
    loads: int = 0
    requests: int = 0


@dataclass
class AdapterInfo:
    name: str
    path: str
    rank: int
    modules: int
    vision: bool
    embeddings: bool
    resident: bool
    loads: int
    requests: int
    uid: int = field(repr=False, default=0)


class LoRAManager:
    """Registered adapters and the slots they occupy (engine thread, except ``register``/``unregister``/
    ``info``, which take the lock)."""

    def __init__(self, model, stacks: LoRAStacks, max_rank: int):
        self.model = model
        self.stacks = stacks
        self.max_rank = max_rank
        self.adapters: dict[str, Registered] = {}
        self._slots: list[str | None] = [None] * stacks.slots
        self._refs = [0] * stacks.slots
        self._recent: OrderedDict[int, None] = OrderedDict((s, None) for s in range(stacks.slots))
        self._uids = itertools.count(1)
        self.evictions = 0
        # register/unregister/info come from other threads (the Triton model's, the API's); slots from the engine's.
        self.lock = threading.RLock()

    # ---------------------------------------------------------------- registry

    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Read and check the adapter (AdapterError, nothing changed, if it can't be used) and register it under
        ``name`` (replacing one of that name that is not in use)."""
        adapter = load_adapter(name, path, self.model, self.max_rank)
        outside = sorted({k.split(".", 2)[2] for k in adapter.weights} - set(self.stacks.targets))
        if outside:
            raise AdapterError(f"adapter {name!r}: LoRA on {', '.join(outside)}; this server serves LoRA on "
                               f"{', '.join(self.stacks.targets)} (lora_target_modules)")  # fmt: skip
        if adapter.has_vision:
            AdapterVision(self.model, adapter.vision)  # checks now (e.g. a 4-bit base), built again when resident
        with self.lock:
            old = self.adapters.get(name)
            if old is not None:
                self._drop(name, old)
            self.adapters[name] = Registered(adapter, next(self._uids))
        logger.info("LoRA adapter %r registered from %s (rank %d, %d modules%s)", name, path, adapter.rank,
                    len(adapter.weights), ", own vision/embeddings" if adapter.vision else "")  # fmt: skip
        return self.info(name)

    def unregister(self, name: str) -> None:
        with self.lock:
            entry = self.adapters.get(name)
            if entry is None:
                raise KeyError(name)
            self._drop(name, entry)
            del self.adapters[name]

    def _drop(self, name: str, entry: Registered) -> None:
        if entry.slot is not None:
            if self._refs[entry.slot]:
                raise AdapterError(f"adapter {name!r} is in use by running requests; try again when they finish")
            self._free_slot(entry)

    def info(self, name: str) -> AdapterInfo:
        with self.lock:
            entry = self.adapters[name]
        a = entry.adapter
        return AdapterInfo(name, str(a.path), a.rank, len(a.weights), a.has_vision, a.has_embeddings,
                           entry.slot is not None, entry.loads, entry.requests, entry.uid)  # fmt: skip

    def uid(self, name: str) -> int:
        return self.adapters[name].uid

    # ---------------------------------------------------------------- slots (engine thread)

    def acquire(self, name: str) -> int | None:
        """The slot of ``name`` with one more reference, putting it in one (evicting the least recently used
        adapter no running sequence uses) if needed; None when every slot is in use."""
        with self.lock:
            entry = self.adapters[name]
            if entry.slot is None:
                free = next((s for s in self._recent if self._refs[s] == 0), None)
                if free is None:
                    return None
                previous = self._slots[free]
                if previous is not None and previous in self.adapters:
                    self._free_slot(self.adapters[previous])
                    self.evictions += 1
                self._load(entry, free)
            self._refs[entry.slot] += 1
            self._recent.move_to_end(entry.slot)
            return entry.slot

    def release(self, slot: int) -> None:
        with self.lock:
            self._refs[slot] -= 1

    def _load(self, entry: Registered, slot: int) -> None:
        adapter = entry.adapter
        self.stacks.write(slot, adapter)
        if adapter.has_vision:
            entry.vision = AdapterVision(self.model, adapter.vision).to(self.stacks.device).eval()
        if adapter.has_embeddings:
            table = adapter.vision["llm.model.embed_tokens.weight"]
            entry.embeddings = table.to(device=self.stacks.device, dtype=self.stacks.dtype)
        entry.slot = slot
        entry.loads += 1
        self._slots[slot] = adapter.name

    def _free_slot(self, entry: Registered) -> None:
        self._slots[entry.slot] = None
        entry.slot, entry.vision, entry.embeddings = None, None, None

    def slot_entry(self, slot: int) -> Registered:
        with self.lock:
            return self.adapters[self._slots[slot]]

    def names(self) -> list[str]:
        with self.lock:
            return list(self.adapters)

    @property
    def resident(self) -> list[str]:
        return [name for name in self._slots if name is not None]
