"""MiniCPM-V 2.6 prompt processing: image-tag expansion, tokenisation, image bounds and left padding.

Follows the original ``MiniCPMVProcessor`` (MODEL_FACTS.md §5.7-5.8) with three deliberate differences:

* image tags are the literal :data:`IMAGE_TAG` and are counted exactly (the original counts them with a regex,
  in which ``.`` matches any character, but splits on the literal; a near-miss such as ``(<image>x</image>)``
  made the two disagree);
* there is no truncation (it would cut image blocks apart); over-long prompts are for the caller to reject;
* the attention mask is derived from the padding, not from ``input_ids != 0`` (see :class:`ProcessorOutput`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from minicpmv.image_processing import ImageProcessor, ProcessedImage

IMAGE_TAG = "(<image>./</image>)"
PAD_TOKEN_ID = 0


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the processor uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int: ...



@dataclass(frozen=True)
class ImageSettings:
    """How one image is read: ``max_slice_nums`` (1: the whole image only; None: the request's or the
    config's) and ``use_image_id`` (the ``<image_id>k</image_id>`` tag before it; None: the config's, true for
    2.6; a video's frames go without)."""

    max_slice_nums: int | None = None
    use_image_id: bool | None = None


def per_image(value, count: int, name: str) -> list:
    """``value`` for each of ``count`` images: a scalar repeated, or a sequence of exactly ``count``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name}: {len(value)} values for {count} images")
        return list(value)
    return [value] * count

@dataclass
class ProcessorOutput:
    """A processed batch of B samples, T = the longest sample's token count.

    ``input_ids``: int64 [B, T], left-padded with id 0. ``attention_mask``: int64 [B, T], 1 on real tokens and
    0 on the left padding. ``pixel_values``: per sample, per chunk, float32 [3, 14, 14L].
    ``tgt_sizes``: per sample int32 [k, 2], (h, w) in patches. ``image_bounds``: per sample int64 [k, 2],
    half-open [start, end) of each ``<unk>`` run in padded-row coordinates, in chunk order.
    ``image_sizes``: per sample, the (width, height) of each input image.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: list[list[torch.Tensor]]
    tgt_sizes: list[torch.Tensor]
    image_bounds: list[torch.Tensor]
    image_sizes: list[list[tuple[int, int]]]


@dataclass
class EncodedSample:
    """One sample before padding: token ids, image bounds ([start, end) pairs) and the processed images."""

    input_ids: list[int]
    image_bounds: list[tuple[int, int]]
    images: list[ProcessedImage]


class MiniCPMVProcessor:
    """Expands image tags into placeholders, tokenises, locates the image bounds and batches samples."""

    def __init__(self, image_processor: ImageProcessor, tokenizer: Tokenizer) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        cfg = image_processor.config
        self._start_ids = {tokenizer.convert_tokens_to_ids(t) for t in (cfg.im_start, cfg.slice_start)}
        self._end_ids = {tokenizer.convert_tokens_to_ids(t) for t in (cfg.im_end, cfg.slice_end)}
        self._unk_id = tokenizer.convert_tokens_to_ids(cfg.unk)

    def expand_prompt(
        self,
        prompt: str,
        images: Sequence[Image.Image | ProcessedImage],
        max_slice_nums: int | None | Sequence[int | None] = None,
        use_image_id: bool | None | Sequence[bool | None] = None,
    ) -> tuple[str, list[ProcessedImage]]:
        """Preprocess ``images`` and replace the k-th :data:`IMAGE_TAG` of ``prompt`` by the k-th placeholder.

        An image that is already a :class:`ProcessedImage` (e.g. from a cache) is used as it is.
        ``max_slice_nums`` and ``use_image_id`` are one value for every image or one per image (a video's frames
        take ``use_image_id=False, max_slice_nums=2`` beside a page's defaults; None: the config's value).

        Image ids count from 0 across the whole prompt. Only the exact literal tag counts as a tag. Raises
        ``ValueError`` when the number of tags differs from the number of images, or from preprocessing.
        """
        pieces = prompt.split(IMAGE_TAG)
        n_tags = len(pieces) - 1
        if n_tags != len(images):
            raise ValueError(
                f"the prompt has {n_tags} image tag(s) {IMAGE_TAG!r} but {len(images)} image(s) were given"
            )
        slices = per_image(max_slice_nums, len(images), "max_slice_nums")
        with_ids = per_image(use_image_id, len(images), "use_image_id")
        processed = [
            image if isinstance(image, ProcessedImage) else self.image_processor.preprocess(image, n)
            for image, n in zip(images, slices, strict=True)
        ]
        parts = [pieces[0]]
        for idx, (image, text_after) in enumerate(zip(processed, pieces[1:], strict=True)):
            parts.append(self.image_processor.placeholder(image, idx, with_ids[idx]))
            parts.append(text_after)
        return "".join(parts), processed

    def encode(
        self,
        prompt: str,
        images: Sequence[Image.Image | ProcessedImage],
        max_slice_nums: int | None | Sequence[int | None] = None,
        use_image_id: bool | None | Sequence[bool | None] = None,
    ) -> EncodedSample:
        """Expand, tokenise (no BOS, no truncation) and locate the image bounds of one sample.

        Raises ``ValueError`` when tags and images disagree, or when the start/end tokens in the ids do not
        give exactly one ``image_feature_size``-long bound per chunk (e.g. user text containing ``<image>``).
        """
        text, processed = self.expand_prompt(prompt, images, max_slice_nums, use_image_id)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bounds = self._find_bounds(ids, sum(image.num_chunks for image in processed))
        return EncodedSample(input_ids=ids, image_bounds=bounds, images=processed)

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> ProcessorOutput:
        """Encode every sample and left-pad them to a common length with id 0.

        ``images[b]`` are the images of ``prompts[b]`` in tag order (None: none); ``images`` None means no
        images at all. Raises
        ``ValueError`` for an empty batch, a length mismatch, or any error of :meth:`encode`.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not a single string")
        if not prompts:
            raise ValueError("at least one prompt is required")
        if images is None:
            images = [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompt(s) but {len(images)} image list(s)")
        samples = [
            self.encode(prompt, sample_images or [], max_slice_nums, use_image_id)
            for prompt, sample_images in zip(prompts, images, strict=True)
        ]

        seq_len = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), seq_len), PAD_TOKEN_ID, dtype=torch.int64)
        # The mask comes from the padding, not from input_ids != 0: id 0 is the real token "!", which the
        # original (input_ids != 0) wrongly masks wherever it occurs in a prompt.
        attention_mask = torch.zeros((len(samples), seq_len), dtype=torch.int64)
        image_bounds, tgt_sizes, pixel_values, image_sizes = [], [], [], []
        for row, sample in enumerate(samples):
            pad = seq_len - len(sample.input_ids)
            input_ids[row, pad:] = torch.tensor(sample.input_ids, dtype=torch.int64)
            attention_mask[row, pad:] = 1
            bounds = torch.tensor(sample.image_bounds, dtype=torch.int64).reshape(-1, 2)
            image_bounds.append(bounds + pad)
            sizes = [size for image in sample.images for size in image.tgt_sizes.tolist()]
            tgt_sizes.append(torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2))
            pixel_values.append([torch.from_numpy(c) for image in sample.images for c in image.chunks])
            image_sizes.append([image.image_size for image in sample.images])
        return ProcessorOutput(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            tgt_sizes=tgt_sizes,
            image_bounds=image_bounds,
            image_sizes=image_sizes,
        )

    def _find_bounds(self, ids: list[int], n_chunks: int) -> list[tuple[int, int]]:
        """Half-open [start, end) of each image/slice block's contents, checked against ``n_chunks``."""
        starts = [pos + 1 for pos, tok in enumerate(ids) if tok in self._start_ids]
        ends = [pos for pos, tok in enumerate(ids) if tok in self._end_ids]
        if len(starts) != n_chunks or len(ends) != n_chunks:
            raise ValueError(
                f"expected {n_chunks} image block(s) for the given images but the tokenised prompt has "
                f"{len(starts)} start and {len(ends)} end token(s); does the text contain image or slice "
                "tokens literally?"
            )
        feature_size = self.image_processor.config.image_feature_size
        bounds = list(zip(starts, ends, strict=True))
        for start, end in bounds:
            if end - start != feature_size or any(tok != self._unk_id for tok in ids[start:end]):
                raise ValueError(
                    f"image block [{start}, {end}) is not {feature_size} placeholder tokens; "
                    "does the text contain image or slice tokens literally?"
                )
        return bounds
