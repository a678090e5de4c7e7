"""Images of requests: their cache keys and slices (caller's thread), their encoding a few slices per step
(engine thread), and the embedding rows that replace their placeholders in the prompt.

Encoding is spread over steps while other sequences decode: a page of 10 slices encoded in one go would hold
their next tokens back by the whole vision pass. Each step takes a prefill chunk's worth of slices, counted as
vLLM counts encoder work, by the embeddings produced (a slice becomes ``query_num`` = 64 LLM positions), so
``max_num_batched_tokens // 64`` slices unless ``max_encoder_slices_per_step`` says otherwise; with nothing
decoding, everything pending is encoded at once.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from minicpmv.engine.request import ImageInput, RequestState
from minicpmv.engine.vision_cache import VisionCache, image_key
from minicpmv.image_processing import ImageProcessor


class ImageEncoder:
    def __init__(self, model, image_processor: ImageProcessor, vision_cache: VisionCache, slices_per_step: int):
        self.model = model
        self.image_processor = image_processor
        self.vision_cache = vision_cache
        self.slices_per_step = slices_per_step
        # A LoRA adapter's own vision tower (engine/lora.py), by adapter name, while it is resident.
        self.vision_for = lambda name: None

    # ---------------------------------------------------------------- caller's thread

    def image_input(self, image, max_slice_nums: int | None, index: int, adapter: str | None = None,
                    salt: str | None = None) -> ImageInput:  # fmt: skip
        """The image's cached layout and embeddings, or its slices. An image opened lazily (header only) is
        decoded here, on a miss only. ``adapter``: a LoRA adapter with its own vision tower encodes it, and its
        cache key carries ``salt`` (an embedding of another tower must never be a hit). Raises ValueError for a
        file that does not decode (the request's error)."""
        key = image_key(image, max_slice_nums)
        if adapter is not None:
            key = f"{key}@{salt}"
        cached = self.vision_cache.get(key)
        if cached is not None:
            return ImageInput(key, cached.layout, cached.embeds, adapter=adapter)
        try:
            image.load()
        except (OSError, SyntaxError) as e:
            raise ValueError(f"image {index}: not a decodable image ({type(e).__name__}: {e})") from e
        return ImageInput(key, self.image_processor.preprocess(image, max_slice_nums), adapter=adapter)

    @staticmethod
    def content_spans(images: list[ImageInput], bounds: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """(start, end, "<image key>#<slice>") of every slice placeholder span, in prompt order: what the
        prefix cache keys blocks by, besides their token ids."""
        spans, k = [], 0
        for image in images:
            for chunk in range(image.processed.num_chunks):
                start, end = bounds[k]
                spans.append((int(start), int(end), f"{image.key}#{chunk}"))
                k += 1
        return spans

    @staticmethod
    def finish(state: RequestState) -> None:
        """Once every image of ``state`` is encoded: the embedding rows for its placeholder positions."""
        if not state.images or any(image.embeds is None for image in state.images):
            return
        positions = torch.cat([torch.arange(start, end) for start, end, _ in state.content_spans])
        embeds = torch.cat([image.embeds for image in state.images])
        state.vision_embeds = embeds.reshape(-1, embeds.shape[-1])
        state.vision_positions = positions
        state.vision_end = int(positions.max()) + 1

    # ---------------------------------------------------------------- engine thread

    def step(self, states: list[RequestState], others_decoding: bool) -> None:
        """Encode the next slices of ``states`` (oldest first): ``slices_per_step`` of them while
        ``others_decoding``, else all. A seeded request's image is encoded in calls of its own, of
        ``slices_per_step`` slices each (the last one the rest), so that its embeddings do not depend on what
        else is encoded with it; such a call waits for a step it fits in whole."""
        budget = self.slices_per_step if others_decoding else 1 << 30
        shared: list[tuple[ImageInput, int, int]] = []  # (image, first slice, slice count), one call
        own: list[tuple[ImageInput, int, int]] = []  # seeded images' groups: one call each
        pending = [(state, image) for state in states for image in state.images if image.embeds is None]
        for state, image in pending:
            first = image.slices_done
            left = image.processed.num_chunks - first
            if state.sampling.seed is None:
                count = min(left, budget)
                shared.append((image, first, count))
                budget -= count
            else:
                while left > 0:
                    count = min(left, self.slices_per_step)
                    if count > budget and (shared or own):
                        budget = 0  # it waits, and so does every younger image
                        break
                    own.append((image, first, count))
                    first, left, budget = first + count, left - count, budget - count
            if budget <= 0:
                break
        groups: dict[str | None, list] = {}  # one call per vision tower: the base's, or an adapter's own
        for work in shared:
            groups.setdefault(work[0].adapter, []).append(work)
        calls = [[work] for work in own] + list(groups.values())
        for work in calls:
            self._encode(work)
        if calls:
            for state in states:
                self.finish(state)

    def _encode(self, work: list[tuple[ImageInput, int, int]]) -> None:
        """One vision-tower call over the slices ``work`` names; an image whose last slice is in it gets its
        embeddings (and enters the vision cache)."""
        pixels = [torch.from_numpy(chunk) for image, first, n in work
                  for chunk in image.processed.chunks[first : first + n]]  # fmt: skip
        sizes = torch.cat([torch.as_tensor(image.processed.tgt_sizes).reshape(-1, 2)[first : first + n]
                           for image, first, n in work])  # fmt: skip
        owner = work[0][0].adapter
        tower = self.model if owner is None else self.vision_for(owner)
        if tower is None:
            raise RuntimeError(f"LoRA adapter {owner!r} is not resident while its images are encoded")
        with torch.inference_mode():
            encoded = tower.encode_images(pixels, sizes)
        offset = 0
        for image, _, n in work:
            image.encoded.append(encoded[offset : offset + n])
            offset += n
            if image.slices_done == image.processed.num_chunks:
                image.embeds = torch.cat(image.encoded)
                image.encoded = []
                self.vision_cache.put(image.key, image.processed, image.embeds)
                image.processed = replace(image.processed, chunks=[])  # the pixels are no longer needed
