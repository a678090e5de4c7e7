"""The generation engine: iteration-level (continuous) batching on one background thread.

Why our own loop rather than transformers' continuous batching: that manager takes token ids
only (no inputs_embeds, so no images without extra machinery) and does not cover per-request
seeds, repetition/presence penalties, grammar-constrained decoding, logprobs and cancellation
the way serving needs them. Ours is small and owns every one of those features.

Each loop iteration: drop cancelled requests, admit waiting requests in arrival order while
the budgets allow (running sequences, reserved KV tokens, prefill tokens), prefill them (vision
encoding included, with an LRU cache of image embeddings), then run one decode step for every
running sequence and retire the finished ones. CPU-side preparation (chat template, image
slicing, tokenisation, validation) happens in ``submit`` on the caller's thread, so that a bad
request fails there with an exception and the engine thread only runs the model.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from minicpmv.chat import ChatFormatError, format_chat
from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.engine.errors import (
    ContextLengthError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
)
from minicpmv.engine.model_runner import ModelRunner
from minicpmv.engine.request import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    Delta,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    RequestHandle,
    RequestState,
    Sequence,
)
from minicpmv.engine.sampler import LogitsProcessor
from minicpmv.engine.structured import GrammarCompilerCache, GrammarState
from minicpmv.engine.vision_cache import VisionCache, image_key
from minicpmv.image_processing import ImageProcessor
from minicpmv.processing import MiniCPMVProcessor

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Limits of one engine (one model instance).

    ``max_num_seqs``: sequences decoded together. ``max_total_tokens``: KV budget, the sum over running
    sequences of prompt + max_tokens. ``max_prefill_tokens``: padded prompt tokens prefilled in one
    forward. ``max_waiting``: requests queued before ``submit`` raises QueueFullError.
    ``max_model_len``: context limit (default: the model's max_position_embeddings).
    """

    max_num_seqs: int = 16
    max_total_tokens: int = 131072
    max_prefill_tokens: int = 8192
    max_waiting: int = 256
    max_model_len: int | None = None
    default_max_tokens: int = 2048
    vision_cache_size: int = 64
    default_max_slice_nums: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_total_tokens", "max_prefill_tokens", "max_waiting", "default_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")


class Engine:
    def __init__(self, model, tokenizer, image_processor: ImageProcessor, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.processor = MiniCPMVProcessor(image_processor, tokenizer)
        self.runner = ModelRunner(model)
        self.max_model_len = self.config.max_model_len or model.config.max_position_embeddings
        self.vision_cache = VisionCache(self.config.vision_cache_size)
        self.grammars = GrammarCompilerCache(tokenizer, model.config.vocab_size)
        self.logits_processor = LogitsProcessor(tokenizer, model.config.vocab_size, self.runner.device)
        self._waiting: deque[RequestState] = deque()
        self._requests: dict[str, RequestState] = {}
        self._running: list[Sequence] = []
        self._cache = None
        self._cv = threading.Condition()
        self._stop = False
        self.num_generated_tokens = 0
        self.num_steps = 0
        self._thread = threading.Thread(target=self._loop, name="minicpmv-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, checkpoint, *, device="cpu", dtype="auto", quantization=None,
                        attn_implementation="sdpa", config: EngineConfig | None = None) -> Engine:
        """Load model, tokenizer and image processor from a local checkpoint directory.

        The model arguments are ``load_model``'s: dtype "auto" is the checkpoint's own, on the CPU too.
        """
        from minicpmv.loading import load_model
        from minicpmv.tokenizer import load_tokenizer

        model = load_model(checkpoint, device=device, dtype=dtype, quantization=quantization,
                           attn_implementation=attn_implementation)
        return cls(model, load_tokenizer(checkpoint), ImageProcessor.from_pretrained(checkpoint), config)

    # ---------------------------------------------------------------- public API

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest, callback: Callable[[Delta], None] | None = None) -> RequestHandle:
        """Validate and queue ``request``. Deltas go to ``callback`` (called on the engine thread) or,
        without one, to the returned handle. Raises InvalidRequestError (incl. ContextLengthError),
        QueueFullError or EngineStoppedError; nothing is queued then."""
        return self.enqueue(self.prepare(request, callback))

    def prepare(self, request: GenerationRequest, callback: Callable[[Delta], None] | None = None) -> RequestState:
        """The validation and CPU work of ``submit``, without queueing (same errors)."""
        if self._stop:
            raise EngineStoppedError("the engine is shut down")
        return self._prepare(request, callback)

    def enqueue(self, state: RequestState) -> RequestHandle:
        """Queue a prepared request (see ``prepare``); raises QueueFullError or InvalidRequestError."""
        request = state.request
        with self._cv:
            if request.request_id in self._requests:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting; retry later")
            self._requests[request.request_id] = state
            self._waiting.append(state)
            self._cv.notify()
        return RequestHandle(state, self.cancel)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    def cancel(self, request_id: str) -> None:
        """The request leaves the batch at the next step; its choices end with finish_reason "cancelled"."""
        with self._cv:
            state = self._requests.get(request_id)
            if state is not None:
                state.cancelled.set()
                self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; unfinished requests end with an error delta."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        for state in list(self._requests.values()):
            self._finish_request(state, FINISH_ERROR, "the engine was shut down")

    # ---------------------------------------------------------------- preparation (caller thread)

    def _prepare(self, request: GenerationRequest, callback) -> RequestState:
        params = request.sampling
        params.validate()
        max_slice_nums = request.max_slice_nums or self.config.default_max_slice_nums
        try:
            if (request.messages is None) == (request.prompt is None):
                raise InvalidRequestError("give either messages or prompt")
            if request.messages is not None:
                chat = format_chat(request.messages, self.tokenizer, request.images)
                prompt, pil_images = chat.prompt, chat.images
            else:
                prompt, pil_images = request.prompt, list(request.images)
            images = [self._image_input(image, max_slice_nums) for image in pil_images]
            encoded = self.processor.encode(prompt, [i.processed for i in images], max_slice_nums)
        except (ChatFormatError, ValueError) as e:
            raise InvalidRequestError(str(e)) from e
        prompt_len = len(encoded.input_ids)
        room = self.max_model_len - prompt_len
        max_tokens = params.max_tokens or min(self.config.default_max_tokens, room)
        if max_tokens < 1 or prompt_len + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more than the "
                f"model's context of {self.max_model_len} tokens"
            )
        if (prompt_len + max_tokens) * params.n > self.config.max_total_tokens:
            raise ContextLengthError(
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) times n ({params.n}) exceeds this "
                f"engine's token budget of {self.config.max_total_tokens}"
            )
        grammar = None
        if params.response_format is not None:
            try:
                grammar = self.grammars.compile(params.response_format)
            except ValueError as e:
                raise InvalidRequestError(str(e)) from e
        state = RequestState(request, encoded.input_ids, encoded.image_bounds, images, max_tokens, callback)
        state.prompt = prompt
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            state.sequences.append(Sequence(
                request=state,
                index=index,
                prompt_ids=encoded.input_ids,
                generator=self._generator(seed) if not params.greedy else None,
                detokenizer=IncrementalDetokenizer(self.tokenizer, encoded.input_ids, params.stop),
                grammar=GrammarState(grammar) if grammar is not None else None,
                logprobs=[] if params.logprobs else None,
            ))  # fmt: skip
        return state

    def _image_input(self, image, max_slice_nums) -> ImageInput:
        key = image_key(image, max_slice_nums)
        cached = self.vision_cache.get(key)
        if cached is not None:
            return ImageInput(key, cached.layout, cached.embeds)
        return ImageInput(key, self.processor.image_processor.preprocess(image, max_slice_nums))

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return generator

    # ---------------------------------------------------------------- the loop (engine thread)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    return
                admitted = self._admit()
            try:
                self._drop_cancelled()
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._decode_step()
            except Exception as e:  # a failed step fails its requests, never the engine
                logger.exception("engine step failed")
                for state in {seq.request for seq in self._running} | set(admitted):
                    self._finish_request(state, FINISH_ERROR, f"internal error: {type(e).__name__}: {e}")
                self._running, self._cache = [], None

    def _admit(self) -> list[RequestState]:
        admitted: list[RequestState] = []
        seqs = len(self._running)
        reserved = sum(seq.reserved_tokens for seq in self._running)
        prefill = 0
        while self._waiting:
            state = self._waiting[0]
            if state.cancelled.is_set():
                self._waiting.popleft()
                admitted.append(state)  # finished as cancelled by _drop_cancelled
                continue
            n = len(state.sequences)
            need = n * (len(state.prompt_ids) + state.max_tokens)
            longest = max([len(s.prompt_ids) for s in admitted] + [len(state.prompt_ids)])
            fits = (
                seqs + n <= self.config.max_num_seqs
                and reserved + need <= self.config.max_total_tokens
                and (not admitted or longest * (prefill + n) <= self.config.max_prefill_tokens)
            )
            if not fits:
                break
            self._waiting.popleft()
            admitted.append(state)
            seqs, reserved, prefill = seqs + n, reserved + need, prefill + n
        return admitted

    def _drop_cancelled(self) -> None:
        with self._cv:  # submit() adds to _requests from other threads
            cancelled = [s for s in self._requests.values() if s.cancelled.is_set()]
            for state in cancelled:
                if state in self._waiting:
                    self._waiting.remove(state)
        if not cancelled:
            return
        self._retire({seq for state in cancelled for seq in state.sequences})
        for state in cancelled:
            self._finish_request(state, FINISH_CANCELLED)

    def _finish_request(self, state: RequestState, reason: str, error: str | None = None) -> None:
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = reason
                state.emit(Delta(state.request_id, seq.index, seq.detokenizer.flush() if not error else "", [],
                                 seq.prompt_len, len(seq.output_ids), reason, None, error))
        with self._cv:
            self._requests.pop(state.request_id, None)

    def _prefill(self, admitted: list[RequestState]) -> None:
        states = [s for s in admitted if not s.cancelled.is_set() and s.request_id in self._requests]
        if not states:
            return
        self._encode_images(states)
        seqs = [seq for state in states for seq in state.sequences]
        length = max(seq.prompt_len for seq in seqs)
        device = self.runner.device
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        valid = torch.zeros(len(seqs), length, dtype=torch.bool)
        image_embeds, bounds = [], []
        for row, seq in enumerate(seqs):
            pad = length - seq.prompt_len
            ids[row, pad:] = torch.tensor(seq.prompt_ids)
            valid[row, pad:] = True
            state = seq.request
            image_embeds.append(torch.cat([i.embeds for i in state.images]) if state.images else None)
            bounds.append(torch.tensor(state.image_bounds, dtype=torch.long).reshape(-1, 2) + pad)
        with torch.inference_mode():
            embeds = self.model.embed(ids.to(device), image_embeds, bounds)
            logits, cache = self.runner.prefill(embeds, valid.to(device))
        if self._cache is None:
            self._cache = cache
        else:
            self._cache.merge(cache)
        self._running.extend(seqs)
        self._process(seqs, logits)

    def _encode_images(self, states: list[RequestState]) -> None:
        todo = [image for state in states for image in state.images if image.embeds is None]
        if not todo:
            return
        pixels = [torch.from_numpy(chunk) for image in todo for chunk in image.processed.chunks]
        sizes = torch.cat([torch.as_tensor(image.processed.tgt_sizes).reshape(-1, 2) for image in todo])
        with torch.inference_mode():
            encoded = self.model.encode_images(pixels, sizes)
        offset = 0
        for image in todo:
            k = image.processed.num_chunks
            image.embeds = encoded[offset : offset + k]
            offset += k
            self.vision_cache.put(image.key, image.processed, image.embeds)
            image.processed = replace(image.processed, chunks=[])  # the pixels are no longer needed

    def _decode_step(self) -> None:
        last = torch.tensor([seq.output_ids[-1] for seq in self._running], dtype=torch.long)
        positions = torch.tensor([seq.prompt_len + len(seq.output_ids) - 1 for seq in self._running])
        logits = self.runner.decode(last, positions, self._cache)
        self.num_steps += 1
        self._process(list(self._running), logits)

    def _process(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence, emit deltas, retire the finished."""
        finished = set()
        choices = self.logits_processor.choose_all(seqs, logits)
        for seq, (token, logprob) in zip(seqs, choices, strict=True):
            delta = self._advance(seq, token, logprob)
            seq.request.emit(delta)
            if seq.finish_reason is not None:
                finished.add(seq)
        self.num_generated_tokens += len(seqs)
        if finished:
            self._retire(finished)
            for state in {seq.request for seq in finished}:
                if all(s.finish_reason is not None for s in state.sequences):
                    with self._cv:
                        self._requests.pop(state.request_id, None)

    def _advance(self, seq: Sequence, token: int, logprob) -> Delta:
        state = seq.request
        params = state.sampling
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        is_stop_token = token in params.stop_token_ids and not params.ignore_eos
        text = "" if is_stop_token else seq.detokenizer.add(token)
        if is_stop_token or seq.detokenizer.stopped or (seq.grammar is not None and seq.grammar.is_terminated()):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= state.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            text += seq.detokenizer.flush()
        return Delta(state.request_id, seq.index, text, [token], seq.prompt_len, len(seq.output_ids),
                     seq.finish_reason, [logprob] if logprob is not None else None)

    def _retire(self, finished: set[Sequence]) -> None:
        keep = [row for row, seq in enumerate(self._running) if seq not in finished]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[row] for row in keep]
        if not keep:
            self._cache = None
        else:
            self._cache.filter(keep)
