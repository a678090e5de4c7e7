"""Helpers for the golden reference data in ``tests/fixtures/golden`` (see its README.md).

* :func:`make_image` regenerates a synthetic image from its recipe (kinds ``grad`` and ``blocks``, modes
  ``RGB`` and ``L``) exactly;
* :func:`load_lut` gives the 256 float32 pixel values that uint8 codes stand for (``pixels = lut[codes]``);
* :func:`chunk_fingerprint` computes a chunk's ``{shape, sha256_f32le, mean, std}`` as the golden files
  store it, :func:`sample_codes` its ``sample_code`` list, :func:`pixel_codes` turns pixels back into codes;
* :func:`load_processor_cases` / :func:`load_model_cases` / :func:`load_npz` read the files.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

GOLDEN_DIR = Path(__file__).resolve().parent / "fixtures" / "golden"

_U32 = np.uint32
_SAMPLE_MULT = 2654435761
_SAMPLE_ADD = 40503
_SAMPLE_COUNT = 256


def hash32(p0: Any, p1: Any, p2: Any, p3: Any) -> np.ndarray:
    """The README's 32-bit integer hash of four (broadcastable) non-negative integer parts, as uint32.

    uint32 numpy arithmetic wraps modulo 2^32, which is exactly the README's arithmetic.
    """
    p0, p1, p2, p3 = (np.asarray(p).astype(np.uint32) for p in (p0, p1, p2, p3))
    h = p0 * _U32(0x9E3779B1) + p1 * _U32(0x85EBCA77) + p2 * _U32(0xC2B2AE3D) + p3 * _U32(0x27D4EB2F)
    h ^= h >> _U32(15)
    h *= _U32(0x2C1B3C6D)
    h ^= h >> _U32(12)
    h *= _U32(0x297A2D39)
    h ^= h >> _U32(15)
    return h


def _grad(recipe: dict[str, Any]) -> np.ndarray:
    w, h, seed = recipe["width"], recipe["height"], recipe["seed"]
    checker, noise = recipe.get("checker", 0), recipe.get("noise", 0)
    x = np.arange(w, dtype=np.int64)[None, :]
    y = np.arange(h, dtype=np.int64)[:, None]
    planes = [
        np.broadcast_to(255 * x // max(w - 1, 1), (h, w)),
        np.broadcast_to(255 * y // max(h - 1, 1), (h, w)),
        (255 * (x + y)) // max(w + h - 2, 1),
    ]
    out = np.empty((h, w, 3), dtype=np.uint8)
    odd = ((x // checker + y // checker) % 2 == 1) if checker > 0 else None
    for ch, plane in enumerate(planes):
        v = plane.astype(np.int64)
        if odd is not None:
            v = np.where(odd, 255 - v, v)
        if noise > 0:
            v = v + (hash32(x, y, ch, seed).astype(np.int64) % (2 * noise + 1)) - noise
        out[:, :, ch] = np.clip(v, 0, 255)
    return out


def _blocks(recipe: dict[str, Any]) -> np.ndarray:
    w, h, seed = recipe["width"], recipe["height"], recipe["seed"]
    bw, bh, stripe = recipe["bw"], recipe["bh"], recipe.get("stripe", 0)
    x = np.arange(w, dtype=np.int64)[None, :]
    y = np.arange(h, dtype=np.int64)[:, None]
    out = np.empty((h, w, 3), dtype=np.uint8)
    for ch in range(3):
        v = (hash32(x // bw, y // bh, ch, seed) % 256).astype(np.int64)
        if stripe > 0:
            v = np.where(((x + y) // stripe) % 4 == 0, 255 - v, v)
        out[:, :, ch] = v
    return out


def make_array(recipe: dict[str, Any]) -> np.ndarray:
    """The recipe's uint8 array: ``[H, W, 3]`` for mode RGB, ``[H, W, 1]`` (the G channel) for mode L."""
    kinds = {"grad": _grad, "blocks": _blocks}
    if recipe["kind"] not in kinds:
        raise ValueError(f"unknown recipe kind {recipe['kind']!r}")
    array = kinds[recipe["kind"]](recipe)
    mode = recipe.get("mode", "RGB")
    if mode == "L":
        return np.ascontiguousarray(array[:, :, 1:2])
    if mode != "RGB":
        raise ValueError(f"unknown recipe mode {mode!r}")
    return array


def make_image(recipe: dict[str, Any]) -> Image.Image:
    """The recipe's image as a PIL image of the recipe's mode (``RGB`` or ``L``)."""
    array = make_array(recipe)
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB")


def rgb_sha256(image: Image.Image) -> str:
    """sha256 of the image's ``[H, W, 3]`` uint8 RGB array (the golden ``rgb_sha256``)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image.convert("RGB"))).tobytes()).hexdigest()


@functools.cache
def load_lut() -> np.ndarray:
    """The golden float32 ``[256]`` pixel table, ``lut[u] = ((u / 255) - 0.5) / 0.5`` in float32."""
    with np.load(GOLDEN_DIR / "processor_arrays.npz") as npz:
        lut = npz["lut"].astype(np.float32)
    lut.setflags(write=False)
    return lut


def pixel_codes(chunk: np.ndarray) -> np.ndarray:
    """Map float32 pixels back to uint8 codes; raises ValueError if a value is not exactly in the LUT."""
    lut = load_lut()
    codes = np.clip(np.searchsorted(lut, chunk), 0, 255).astype(np.uint8)
    if not np.array_equal(lut[codes], chunk):
        raise ValueError("chunk holds values that are not in the pixel LUT")
    return codes


def sample_codes(chunk: np.ndarray) -> list[int]:
    """The golden ``sample_code``: codes at flat indices ``(k * 2654435761 + 40503) mod numel``, k < 256."""
    flat = pixel_codes(chunk).reshape(-1)
    k = np.arange(_SAMPLE_COUNT, dtype=np.int64)
    return flat[(k * _SAMPLE_MULT + _SAMPLE_ADD) % flat.size].tolist()


def chunk_fingerprint(chunk: np.ndarray) -> dict[str, Any]:
    """``{shape, sha256_f32le, mean, std}`` of a chunk as stored in the golden files (float64, ddof 0)."""
    data = np.ascontiguousarray(chunk, dtype="<f4")
    as64 = data.astype(np.float64)
    return {
        "shape": list(data.shape),
        "sha256_f32le": hashlib.sha256(data.tobytes()).hexdigest(),
        "mean": float(as64.mean()),
        "std": float(as64.std()),
    }


@functools.cache
def load_processor_cases() -> dict[str, Any]:
    """``processor_cases.json`` parsed (cached; do not mutate)."""
    return json.loads((GOLDEN_DIR / "processor_cases.json").read_text(encoding="utf-8"))


@functools.cache
def load_model_cases() -> dict[str, Any]:
    """``model_cases.json`` parsed (cached; do not mutate)."""
    return json.loads((GOLDEN_DIR / "model_cases.json").read_text(encoding="utf-8"))


def load_npz(name: str) -> dict[str, np.ndarray]:
    """All arrays of ``<golden>/<name>`` (e.g. ``"processor_arrays.npz"``), loaded eagerly."""
    with np.load(GOLDEN_DIR / name) as npz:
        return {key: npz[key] for key in npz.files}
