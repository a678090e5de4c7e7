"""What goes into the engine (GenerationRequest) and what comes out (a stream of Delta)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from minicpmv.engine.sampling_params import SamplingParams
from minicpmv.image_processing import ProcessedImage

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass
class GenerationRequest:
    """Either chat ``messages`` (OpenAI style; image parts take ``images`` in order) or a raw ``prompt``
    (ChatML text with one IMAGE_TAG per image)."""

    request_id: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_slice_nums: int | None = None
    adapter: str | None = None  # a registered LoRA adapter's name (None: the base model)


@dataclass
class TokenLogprob:
    """A sampled token's logprob and the most likely alternatives, ``top`` = [(id, token, logprob)].

    ``token`` is OpenAI's string for the token alone (``"bytes:\\xe4\\xbd"`` for part of a UTF-8 character) and
    ``token_bytes`` its raw bytes (None for a special token, which adds no text); ``top_bytes`` has those of
    ``top``, in order (see :class:`minicpmv.tokenizer.TokenPieces`)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)
    token_bytes: bytes | None = None
    top_bytes: list[bytes | None] = field(default_factory=list)


@dataclass
class Delta:
    """New output of one choice. ``finish_reason`` is set on a choice's last delta."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    request_id: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ImageInput:
    """One image of a prompt: its content key, its layout, and (before encoding) its pixels. While its
    slices are encoded over several steps, ``encoded`` holds the parts done so far."""

    key: str
    processed: ProcessedImage
    embeds: torch.Tensor | None = None
    encoded: list[torch.Tensor] = field(default_factory=list)
    adapter: str | None = None  # encoded by this LoRA adapter's own vision tower (None: the base's)

    @property
    def slices_done(self) -> int:
        return sum(len(part) for part in self.encoded)


@dataclass(eq=False)  # identity semantics: sequences are kept in sets
class Sequence:
    """One choice of a request while it is generated.

    Its tokens are the prompt's then the outputs'; ``num_computed_tokens`` of them have their K/V in the pool,
    in the blocks of ``block_table`` (in order). ``block_keys`` caches the prefix-cache keys of its full blocks.
    """

    request: RequestState
    index: int
    prompt_ids: list[int]
    generator: torch.Generator | None
    detokenizer: Any
    grammar: Any = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_keys: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    lora_slot: int | None = None  # while running with an adapter: its slot (engine/lora.py)
    # Owned by the output thread (output_processor.py): tokens emitted, and whether the last delta went out.
    num_emitted: int = 0
    output_finished: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens to compute before decoding: the whole prompt (its last token's logits give the first
        output), or, when recomputing after a preemption, all but the last sampled token (which the next
        decode step computes, as it would have without the preemption)."""
        return self.num_tokens - 1 if self.output_ids else self.num_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def seeded(self) -> bool:
        """The request set a seed: its prompt is computed the same way in every run (no prefix-cache reads,
        prefill chunks and image-encoder groups that depend on the request alone), so that its logits, and with
        them its sampled tokens, do not depend on what else the engine runs (README, "Seeds")."""
        return self.request.sampling.seed is not None

    def token_ids_range(self, start: int, end: int) -> list[int]:
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:prompt] + self.output_ids[max(start - prompt, 0) : end - prompt]


class RequestState:
    """The engine's side of a request: its sequences, images and where deltas go."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], image_bounds: list[tuple[int, int]],
                 images: list[ImageInput], max_tokens: int, callback: Callable[[Delta], None] | None):
        self.request = request
        self.request_id = request.request_id
        self.sampling = request.sampling
        self.prompt = request.prompt or ""  # the rendered prompt text (image tags unexpanded)
        self.prompt_tensor: torch.Tensor | None = None  # prompt ids on the model device, for penalties
        self.prompt_ids = prompt_ids
        self.image_bounds = image_bounds
        self.images = images
        self.max_tokens = max_tokens
        self.sequences: list[Sequence] = []
        self.cancelled = threading.Event()
        # (start, end, content) of each image slice's placeholder span in the prompt: the prefix cache keys
        # blocks by the content of the images they hold (placeholders alone all have the same token id).
        self.content_spans: list[tuple[int, int, str]] = []
        # Once every image is encoded: the prompt positions of image embeddings and the rows for them.
        self.vision_positions: torch.Tensor | None = None
        self.vision_embeds: torch.Tensor | None = None
        self.vision_end = 0
        # A LoRA adapter's KV differs from the base's: its blocks' prefix-cache keys start from this salt.
        self.cache_salt: bytes | None = None
        self.unfinished = request.sampling.n
        self._callback = callback
        self._queue: queue.Queue[Delta | None] = queue.Queue()

    @property
    def images_ready(self) -> bool:
        return not self.images or self.vision_positions is not None

    def emit(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.unfinished -= 1
        if self._callback is not None:
            try:
                self._callback(delta)
            except Exception:  # a broken consumer must not take the engine down
                logger.exception("delta callback of request %s failed", self.request_id)
        else:
            self._queue.put(delta)
            if self.unfinished == 0:
                self._queue.put(None)


class RequestHandle:
    """Returned by ``Engine.submit``: iterate for the deltas (ends after every choice finished)."""

    def __init__(self, state: RequestState, cancel: Callable[[str], None]):
        self._state = state
        self._cancel = cancel
        self.request_id = state.request_id
        self.prompt_tokens = len(state.prompt_ids)

    def __iter__(self) -> Iterator[Delta]:
        while True:
            delta = self._state._queue.get()
            if delta is None:
                return
            yield delta

    def cancel(self) -> None:
        self._cancel(self.request_id)

    def result(self) -> GenerationResult:
        """Wait for the end and collect the deltas per choice."""
        choices = [Choice(index=i) for i in range(self._state.sampling.n)]
        completion = 0
        for delta in self:
            choice = choices[delta.index]
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            if delta.logprobs is not None:
                choice.logprobs = (choice.logprobs or []) + delta.logprobs
            if delta.finish_reason is not None:
                choice.finish_reason = delta.finish_reason
                choice.error = delta.error
                completion += delta.completion_tokens
        return GenerationResult(self.request_id, choices, self.prompt_tokens, completion)
