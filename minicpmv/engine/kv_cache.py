"""A left-padded KV cache for a batch whose members come and go between decode steps.

Every running sequence owns one row. Rows are right-aligned: a decode step writes all new
keys at the same column, and a row's earlier columns that it does not use are padding,
masked out. Joining requests (``merge``) pads the shorter cache on the left; leaving ones
(``filter``) drop their rows and the columns no remaining row uses. This is the scheme of
TGI's first engine: simple, correct for any mix of lengths, with padding as its only waste.

The time axis has spare capacity, grown by doubling, so a decode step writes in place
instead of copying the whole cache.
"""

from __future__ import annotations

import torch


class BatchKVCache:
    def __init__(self, num_layers: int, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor):
        """``keys``/``values``: per layer [B, H, capacity, D]; ``mask``: bool [B, length] (True = real token)."""
        self.num_layers = num_layers
        self.keys = keys
        self.values = values
        self.mask = mask

    @classmethod
    def empty(cls, num_layers: int, batch: int, heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (batch, heads, max(capacity, 1), head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(num_layers, keys, values, torch.zeros(batch, 0, dtype=torch.bool, device=device))

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, new_tokens: int, valid: torch.Tensor) -> None:
        """Open ``new_tokens`` columns at the end; ``valid`` bool [B, new_tokens] marks the real ones."""
        needed = self.length + new_tokens
        if needed > self.capacity:
            self._resize(max(needed, 2 * self.capacity))
        self.mask = torch.cat([self.mask, valid.to(self.mask.device)], dim=1)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the last-reserved columns of ``layer``; returns the layer's keys/values so far [B, H, T, D]."""
        end = self.length
        start = end - keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _resize(self, capacity: int, offset: int = 0, rows: torch.Tensor | None = None) -> None:
        """Re-allocate with ``capacity`` columns, keeping columns [offset, length) of the chosen rows."""
        keep = self.length - offset
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                src = old if rows is None else old.index_select(0, rows)
                new = src.new_zeros(src.shape[0], src.shape[1], capacity, src.shape[3])
                new[:, :, :keep] = src[:, :, offset : self.length]
                store[i] = new

    def filter(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop leading columns that no kept row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0)
        offset = int(used.float().argmax()) if bool(used.any()) else self.length
        self._resize(max(self.length - offset, 1) + 16, offset=offset, rows=index)
        self.mask = mask[:, offset:]

    def merge(self, other: BatchKVCache) -> None:
        """Append ``other``'s rows below ours, right-aligning both on the time axis."""
        length = max(self.length, other.length)
        capacity = length + 16
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i in range(self.num_layers):
                a, b = mine[i], theirs[i]
                out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3])
                out[: a.shape[0], :, length - self.length : length] = a[:, :, : self.length]
                out[a.shape[0] :, :, length - other.length : length] = b[:, :, : other.length]
                mine[i] = out
        pad_a = self.mask.new_zeros(self.batch_size, length - self.length)
        pad_b = other.mask.new_zeros(other.batch_size, length - other.length)
        self.mask = torch.cat([torch.cat([pad_a, self.mask], 1), torch.cat([pad_b, other.mask], 1)], 0)
