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

from minicpmv.engine.config import ATTENTION_TARGETS
from minicpmv.lora import AdapterError, LoRAAdapter, load_adapter, module_key

logger = logging.getLogger(__name__)



@dataclass
class LoRAStep:
    """What a step's LoRA terms need: the row mask (torch path) or the tile table and the split count of
    each input width (the Triton kernels, kernels/lora.py)."""

    mask: torch.Tensor | None = None  # [T, S * R]
    tiles: torch.Tensor | None = None  # [N, 3] int32 (first row, rows, slot)
    splits: dict[int, int] = field(default_factory=dict)  # in_features -> shrink splits


class LoRAStacks:
    """The device stacks of ``slots`` adapters of rank up to ``rank`` for the ``targets`` of every layer.

    Two ways to add a step's LoRA terms, same arithmetic: the masked two-matmul over all slots (torch, any
    device; the reference) and, where ``kernel`` (default: on CUDA, if they agree with the torch path on a
    start-up self-test), the Triton shrink/expand kernels over the step's segments of rows (kernels/lora.py),
    which read only each row's own adapter."""

    def __init__(self, model, slots: int, rank: int, targets: tuple[str, ...], device, dtype,
                 kernel: bool | None = None):  # fmt: skip
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
        self.sm_count = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else 0)  # fmt: skip
        self.kernel = False
        self.selection = "torch (masked matmuls over the slots)"
        if kernel or (kernel is None and self.device.type == "cuda"):
            error = self._kernel_self_test()
            if error is None:
                self.kernel = True
                self.selection = "Triton shrink/expand kernels (passed the self-test)"
            elif kernel:
                raise RuntimeError(f"the LoRA kernels are not usable here: {error}")
            else:
                self.selection = f"torch: the LoRA kernels are not usable here ({error})"
                logger.warning("LoRA: %s", self.selection)
        logger.info("LoRA: %d slots of rank %d on %s, %.1f MiB; %s", slots, rank, ", ".join(targets),
                    self.nbytes / 2**20, self.selection)  # fmt: skip

    def _kernel_self_test(self) -> str | None:
        """None if the kernels agree with the masked matmuls on random stacks and rows of three slots and none
        (relative to the result's scale, as attention.py's self-test); else what differs."""
        from minicpmv.engine.attention import mismatch
        from minicpmv.engine.kernels import lora as kernels

        generator = torch.Generator().manual_seed(0)
        slots, rank, width, out = 3, min(self.rank, 16), 96, 80
        a = torch.randn(slots * rank, width, generator=generator).to(self.device, self.dtype)
        b = (torch.randn(out, slots * rank, generator=generator) / rank).to(self.device, self.dtype)
        x = torch.randn(21, width, generator=generator).to(self.device, self.dtype)
        rows = [0] * 5 + [-1] * 3 + [2] * 9 + [1] * 2 + [0] * 2
        mask = (torch.arange(slots * rank, device=self.device)[None, :] // rank
                == torch.tensor(rows, device=self.device)[:, None]).to(self.dtype)  # fmt: skip
        expected = ((x @ a.T) * mask) @ b.T
        try:
            got = torch.zeros_like(expected)
            tiles = torch.from_numpy(kernels.segment_tiles(rows)).to(self.device)
            kernels.lora_delta(x, a.view(slots, rank, width), b.view(out, slots, rank).transpose(0, 1), got, tiles,
                               num_splits=2)  # fmt: skip
        except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
            return f"{type(e).__name__}: {e}"
        return mismatch(got, expected)

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

    def step(self, row_slots: torch.Tensor, tiles: torch.Tensor | None = None) -> LoRAStep:
        """A step's LoRA state from its rows' slots [T] (device; -1: no adapter). For the kernels, ``tiles``
        (segment_tiles of the host's slots, on the device) or, when None, one tile per row (a decode step)."""
        if not self.kernel:
            return LoRAStep(mask=(self._column_slot[None, :] == row_slots[:, None]).to(self.dtype))
        from minicpmv.engine.kernels import lora as kernels

        if tiles is None:  # one row per tile; rows of no adapter: 0-row tiles (no-ops), shapes fixed by T
            rows = torch.arange(row_slots.shape[0], device=self.device)
            tiles = torch.stack([rows, (row_slots >= 0).long(), row_slots.clamp(min=0)], dim=1)
        tiles = tiles.to(torch.int32).contiguous()
        widths = {self.a[key].shape[1] for key in self.a}
        splits = {w: kernels.shrink_splits(tiles.shape[0], w, self.sm_count) for w in widths}
        return LoRAStep(tiles=tiles, splits=splits)

    def add(self, key: str, x: torch.Tensor, y: torch.Tensor, step: LoRAStep) -> torch.Tensor:
        """``y`` (the base layer's output for the rows of ``x`` [T, in]) plus the rows' LoRA terms of
        layer-module ``key``."""
        if step.mask is not None:
            return y + ((x @ self.a[key].T) * step.mask) @ self.b[key].T
        from minicpmv.engine.kernels import lora as kernels

        a, b = self.a[key], self.b[key]
        slots, rank = self.slots, self.rank
        kernels.lora_delta(x.contiguous(), a.view(slots, rank, a.shape[1]),
                           b.view(b.shape[0], slots, rank).transpose(0, 1), y, step.tiles,
                           num_splits=step.splits[a.shape[1]])  # fmt: skip
        return y


def _linear(layer, name: str):
    return getattr(layer.self_attn if name in ATTENTION_TARGETS else layer.mlp, name)


class AdapterVision(nn.Module):
    """An adapter's own vision tower and resampler (copies of the base's with its weights), encoding images as
    ``MiniCPMV.encode_images`` does."""

    def __init__(self, model, state: dict[str, torch.Tensor]):
        super().__init__()
        self.check(model)
        self.config = model.config
        self.vpm = copy.deepcopy(model.vpm)
        self.resampler = copy.deepcopy(model.resampler)
        own = {k: v for k, v in state.items() if k.startswith(("vpm.", "resampler."))}
        missing = self.load_state_dict(own, strict=False)
        if missing.unexpected_keys:
            raise AdapterError(f"unexpected vision weights: {missing.unexpected_keys[:5]}")

    @staticmethod
    def check(model) -> None:
        """Raises AdapterError where an adapter's own vision tower can't be served over this base: its float
        weights would go into the base's 4-bit (bitsandbytes) layers."""
        for module in (model.vpm, model.resampler):
            if any(type(sub).__module__.startswith("bitsandbytes") for sub in module.modules()):
                raise AdapterError("an adapter with its own vision tower is not served over a 4-bit base yet")

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
            try:
                AdapterVision.check(self.model)  # now, not when a request first needs it
            except AdapterError as e:
                raise AdapterError(f"adapter {name!r}: {e}") from None
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
