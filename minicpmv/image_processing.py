"""MiniCPM-V 2.6 image preprocessing: slicing, resizing, normalisation and patch layout.

Reproduces the original ``MiniCPMVImageProcessor`` bit for bit (MODEL_FACTS.md §5.1-5.7):

* every image is converted to RGB, then resized with PIL ``BICUBIC`` on uint8 (antialiased);
* large images are cut into a grid of slices chosen by :func:`get_sliced_grid`; the first chunk is always
  the overview (the whole image), the slices follow row by row;
* each chunk is normalised as ``((u / 255) - mean) / std`` in float32 and laid out by
  :func:`reshape_by_patch`.

Unlike the original, every image of at least 1x1 pixels is accepted (the original mistakes 1- or 3-pixel-high
images for channels-first arrays and crashes).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"


@dataclass(frozen=True)
class PreprocessorConfig:
    """The fields of ``preprocessor_config.json`` that drive preprocessing (defaults = MiniCPM-V 2.6).

    Construction validates every field and raises ``ValueError`` naming the offending field.
    """

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    use_image_id: bool = True
    image_feature_size: int = 64
    slice_mode: bool = True
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    im_start: str = "<image>"
    im_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    unk: str = "<unk>"
    im_id_start: str = "<image_id>"
    im_id_end: str = "</image_id>"

    def __post_init__(self) -> None:
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preprocessor config: {name} must be an integer >= 1, got {value!r}")
        for name in ("use_image_id", "slice_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"preprocessor config: {name} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("norm_mean", "norm_std"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
                or not all(math.isfinite(v) for v in value)
            ):
                raise ValueError(
                    f"preprocessor config: {name} must be 3 finite numbers (R, G, B), got {value!r}"
                )
        if any(v == 0 for v in self.norm_std):
            raise ValueError(f"preprocessor config: norm_std must not contain 0, got {self.norm_std!r}")
        for name in ("im_start", "im_end", "slice_start", "slice_end", "unk", "im_id_start", "im_id_end"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"preprocessor config: {name} must be a non-empty string, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessorConfig:
        """Build a config from a parsed ``preprocessor_config.json``.

        Keys that are not fields (``auto_map``, ``image_processor_type``, ``processor_class``, ``version``,
        ...) are ignored; missing keys take the defaults. Raises ``ValueError`` for a non-dict or an invalid
        value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"preprocessor config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        ignored = sorted(set(data) - known)
        if ignored:
            logger.debug("preprocessor config: ignoring keys %s", ignored)
        kwargs = {k: v for k, v in data.items() if k in known}
        for name in ("norm_mean", "norm_std"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PreprocessorConfig:
        """Read ``<directory>/preprocessor_config.json``; a missing file gives the defaults.

        Raises ``ValueError`` when the file is not valid JSON or holds an invalid value.
        """
        path = Path(directory) / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            logger.info("%s not found, using the MiniCPM-V 2.6 defaults", path)
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


@dataclass
class ProcessedImage:
    """One preprocessed image.

    ``chunks``: float32 ``[3, p, p*h*w]`` arrays, the overview first, then the slices row-major.
    ``tgt_sizes``: int64 ``[k, 2]``, (h, w) of each chunk in patches. ``grid``: (cols, rows), or None when
    the image was not sliced. ``overview_size`` / ``refine_size`` / ``image_size``: (width, height) in pixels
    of the overview, of the image the slices were cut from (None when not sliced), and of the input image.
    """

    chunks: list[np.ndarray]
    tgt_sizes: np.ndarray
    grid: tuple[int, int] | None
    overview_size: tuple[int, int]
    refine_size: tuple[int, int] | None
    image_size: tuple[int, int]

    @property
    def num_chunks(self) -> int:
        """Number of vision chunks (1 overview + cols*rows slices); valid after the pixels were dropped."""
        return int(self.tgt_sizes.shape[0])


def ensure_divide(length: float, multiple: int) -> int:
    """Round ``length`` to the nearest multiple of ``multiple``, but at least ``multiple``.

    Uses Python ``round`` (half to even) on the float quotient, as the original does.
    """
    return max(round(length / multiple) * multiple, multiple)


def find_best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Target (width, height), multiples of ``patch_size``, for resizing an image of ``size`` (w, h).

    Images larger than ``scale_resolution``² pixels (or any image when ``allow_upscale``) are rescaled to
    about ``scale_resolution``² pixels keeping the aspect ratio (truncating to int); then both sides are
    rounded with :func:`ensure_divide`.
    """
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(
    size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """(width, height) the whole image is resized to before being cut into ``grid`` (cols, rows).

    Each side is first rounded to a multiple of its grid count, one cell is sized with
    :func:`find_best_resize` (upscaling allowed), and the result is the cell size times the grid.
    """
    cols, rows = grid
    refine_w = ensure_divide(size[0], cols)
    refine_h = ensure_divide(size[1], rows)
    cell_w, cell_h = find_best_resize(
        (refine_w / cols, refine_h / rows), scale_resolution, patch_size, allow_upscale=True
    )
    return cell_w * cols, cell_h * rows


def get_sliced_grid(
    size: tuple[int, int], max_slice_nums: int, scale_resolution: int
) -> tuple[int, int] | None:
    """Slice grid (cols, rows) for an image of ``size`` (w, h), or None when it is not sliced.

    The number of slices is about ``w*h / scale_resolution²``, capped at ``max_slice_nums``; among the factor
    pairs of that count and its neighbours, the grid whose log aspect ratio is nearest to the image's wins,
    the first one under a strict ``<`` in candidate order (MODEL_FACTS.md §5.2; float ties matter).
    """
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    best: tuple[int, int] | None = None
    min_error = math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < min_error:
                best, min_error = (cols, count // cols), error
    return best


def reshape_by_patch(image: np.ndarray, patch_size: int) -> np.ndarray:
    """Lay out a ``[C, H, W]`` image as ``[C, p, p*L]``: its p×p patches side by side in row-major order.

    ``out[c, i, p*l + j] = image[c, p*(l // (W/p)) + i, p*(l % (W/p)) + j]``; H and W must be multiples of p.
    """
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(channels, rows, patch_size, cols, patch_size).transpose(0, 2, 1, 3, 4)
    return patches.reshape(channels, patch_size, rows * cols * patch_size)


class ImageProcessor:
    """Turns PIL images into MiniCPM-V vision chunks and builds their placeholder text."""

    def __init__(self, config: PreprocessorConfig) -> None:
        self.config = config
        mean = np.asarray(config.norm_mean, dtype=np.float32)[:, None]
        std = np.asarray(config.norm_std, dtype=np.float32)[:, None]
        # Per-channel 256-entry table, computed exactly as the original's float32 arithmetic.
        self._lut = ((np.arange(256, dtype=np.float32)[None, :] / np.float32(255)) - mean) / std

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageProcessor:
        """Processor configured from ``<directory>/preprocessor_config.json`` (defaults when absent)."""
        return cls(PreprocessorConfig.from_pretrained(directory))

    def preprocess(self, image: Image.Image, max_slice_nums: int | None = None) -> ProcessedImage:
        """Preprocess one image of any PIL mode and any size >= 1x1.

        ``max_slice_nums`` overrides the config's value for this call. Raises ``ValueError`` when
        ``max_slice_nums < 1``, the image is empty, or PIL cannot convert it to RGB.
        """
        cfg = self.config
        max_slices = cfg.max_slice_nums if max_slice_nums is None else max_slice_nums
        if isinstance(max_slices, bool) or not isinstance(max_slices, Integral) or max_slices < 1:
            raise ValueError(f"max_slice_nums must be an integer >= 1, got {max_slice_nums!r}")
        max_slices = int(max_slices)
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"image must be at least 1x1 pixels, got {width}x{height}")
        if image.mode != "RGB":
            try:
                image = image.convert("RGB")
            except (ValueError, OSError) as exc:
                raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB: {exc}") from exc

        # slice_mode false: overview only. (The original then skipped resizing altogether, giving chunks of
        # arbitrary size; we resize like any unsliced image instead.)
        grid = get_sliced_grid((width, height), max_slices, cfg.scale_resolution) if cfg.slice_mode else None
        s, p = cfg.scale_resolution, cfg.patch_size
        # Unsliced images are upscaled as well; a sliced image's overview is only ever shrunk.
        overview_size = find_best_resize((width, height), s, p, allow_upscale=grid is None)
        arrays = [self._resize(image, overview_size)]
        refine_size = None
        if grid is not None:
            refine_size = get_refine_size((width, height), grid, s, p)
            refined = self._resize(image, refine_size)
            cols, rows = grid
            cell_w, cell_h = refine_size[0] // cols, refine_size[1] // rows
            for r in range(rows):
                for c in range(cols):
                    arrays.append(refined[r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w])

        chunks = [self._to_chunk(a) for a in arrays]
        tgt_sizes = np.array([(a.shape[0] // p, a.shape[1] // p) for a in arrays], dtype=np.int64)
        return ProcessedImage(
            chunks=chunks,
            tgt_sizes=tgt_sizes,
            grid=grid,
            overview_size=overview_size,
            refine_size=refine_size,
            image_size=(width, height),
        )

    def placeholder(self, image: ProcessedImage, image_idx: int, use_image_id: bool | None = None) -> str:
        """The text that stands for ``image`` in the prompt (MODEL_FACTS.md §5.7).

        ``[<image_id>{image_idx}</image_id>]<image>{unk×F}</image>`` followed, for a sliced image, by its
        grid rows joined by ``"\\n"``, each row ``cols`` times ``<slice>{unk×F}</slice>``. ``image_idx`` is
        the image's 0-based index in its sample; ``use_image_id`` None means the config's value.
        """
        cfg = self.config
        with_id = cfg.use_image_id if use_image_id is None else use_image_id
        unks = cfg.unk * cfg.image_feature_size
        text = f"{cfg.im_id_start}{image_idx}{cfg.im_id_end}" if with_id else ""
        text += f"{cfg.im_start}{unks}{cfg.im_end}"
        if cfg.slice_mode and image.grid is not None:
            cols, rows = image.grid
            row = f"{cfg.slice_start}{unks}{cfg.slice_end}" * cols
            text += "\n".join([row] * rows)
        return text

    @staticmethod
    def _resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """Resize an RGB image with PIL bicubic and return it as uint8 ``[H, W, 3]``."""
        return np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC), dtype=np.uint8)

    def _to_chunk(self, array: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, 3]`` -> normalised float32 ``[3, p, p*L]`` chunk."""
        codes = reshape_by_patch(np.ascontiguousarray(array.transpose(2, 0, 1)), self.config.patch_size)
        chunk = np.empty(codes.shape, dtype=np.float32)
        for ch in range(codes.shape[0]):
            np.take(self._lut[ch], codes[ch], out=chunk[ch])
        return chunk
