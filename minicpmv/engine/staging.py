"""A step's integers to the device in one transfer, and the device scope of start-up work.

Every integer a step needs on the device (token ids, positions, slot mappings, block tables, sequence offsets) is
computed on the host with NumPy, written into one host buffer and copied with one non-blocking transfer. On
CUDA the buffer is pinned: a copy from pageable memory (``torch.tensor(list, device="cuda")``) stages through
a driver buffer and blocks the host until it is done, so a dozen of them per step were a dozen host waits. The
pinned buffer comes from torch's caching host allocator, which does not hand it out again before the copy
out of it has finished (it records an event on the copying stream), so reusing memory needs no extra care.
On the CPU the same code runs unpinned and the "copy" is the buffer itself.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch


def upload(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """``arrays`` (int64, any shapes) on ``device``, in one host->device copy: device tensors of the same
    shapes, views of one staged buffer."""
    sizes = [int(a.size) for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.long, pin_memory=device.type == "cuda")
    buffer = host.numpy()
    offset = 0
    for array, size in zip(arrays, sizes, strict=True):
        buffer[offset : offset + size] = array.reshape(-1)
        offset += size
    staged = host.to(device, non_blocking=True)
    return [part.view(array.shape) for part, array in zip(staged.split(sizes), arrays, strict=True)]


def padded_table(tables: Sequence[Sequence[int]], widths: np.ndarray, width: int, fill: int) -> np.ndarray:
    """``[len(tables), width]`` int64: row ``b`` holds the first ``widths[b]`` entries of ``tables[b]``, then
    ``fill``. Built from one flat pass over the used entries (no Python list of rows x width ints)."""
    table = np.full((len(tables), width), fill, dtype=np.int64)
    used = int(widths.sum())
    rows = (itertools.islice(t, int(w)) for t, w in zip(tables, widths, strict=True))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=used)
    table[np.arange(width)[None, :] < widths[:, None]] = flat
    return table


def device_scope(device: torch.device | str):
    """``torch.cuda.device(device)`` on CUDA (kernels, events, streams and graphs of the block go to this
    instance's GPU, and no context is created on GPU 0 by work that names no device), else nothing."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
