"""LRU cache of vision embeddings keyed by image content, so that follow-up turns about the same
page neither re-process nor re-encode it."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from minicpmv.image_processing import ProcessedImage

# Set by whoever opened the image from its encoded file (the Triton adapter): the sha256 of those bytes. The
# same bytes always decode to the same pixels, so the key can come from them, and a cached image is never
# decoded again (a 1344x1344 PNG takes ~20 ms to decode and ~5 ms to hash on these CPUs).
ENCODED_DIGEST = "minicpmv_encoded_sha256"


def image_key(image: Image.Image, max_slice_nums: int | None) -> str:
    """Content key of an image and the slicing setting: from the digest of its encoded bytes when known
    (``ENCODED_DIGEST`` in ``image.info``), else from the decoded pixels (mode, size, bytes)."""
    digest = hashlib.sha256()
    encoded = image.info.get(ENCODED_DIGEST)
    if encoded is not None:
        digest.update(f"encoded:{encoded}:{max_slice_nums}".encode())
        return digest.hexdigest()
    digest.update(f"{image.mode}:{image.size}:{max_slice_nums}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class CachedImage:
    """Slicing layout (pixels dropped) and, once encoded, the [k, Q, D] embeddings on the model device."""

    layout: ProcessedImage
    embeds: torch.Tensor | None = None


class VisionCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedImage | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, image: ProcessedImage, embeds: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        layout = replace(image, chunks=[], tgt_sizes=np.asarray(image.tgt_sizes).copy())
        with self._lock:
            self._entries[key] = CachedImage(layout, embeds)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (for tests and benchmarks)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
