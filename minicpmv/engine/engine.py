"""The generation engine: the request lifecycle around a step loop on one background thread.

Why our own loop rather than transformers' continuous batching: that manager takes token ids
only (no inputs_embeds, so no images without extra machinery) and does not cover per-request
seeds, repetition/presence penalties, grammar-constrained decoding, logprobs and cancellation
the way serving needs them. Ours is small and owns every one of those features.

The parts, as nano-vllm splits them: ``scheduler.py`` decides what each step computes (admission,
chunked prefill under a token budget, preemption), ``block_manager.py`` owns the KV blocks and the
prefix cache, ``kv_pool.py`` the KV tensors (allocated once), ``model_runner.py`` runs a packed step,
``sampler.py`` picks tokens, and this file keeps the lifecycle: ``submit`` (validation and CPU work
on the caller's thread, so a bad request fails there with an exception), the loop (cancellations,
a few image slices encoded per step, one scheduled step, output processing), ``cancel``, ``shutdown``.
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
from minicpmv.engine.block_manager import BlockManager
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
from minicpmv.engine.scheduler import Scheduler
from minicpmv.engine.structured import GrammarCompilerCache, GrammarState
from minicpmv.engine.vision_cache import VisionCache, image_key
from minicpmv.image_processing import ImageProcessor
from minicpmv.processing import MiniCPMVProcessor

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Limits of one engine (one model instance).

    ``max_num_seqs``: sequences running together. ``max_num_batched_tokens``: tokens computed in one step
    (a decoding sequence takes one, prefill chunks the rest: a long prompt is prefilled over several steps).
    ``max_prefill_attention_pairs``: query-key pairs prefill attention may take in one step (a chunk of q tokens
    at context c takes about q * c); unset: no limit. It keeps long-context chunks short where attention is
    the cost of a step (the CPU); see scheduler.py.
    ``max_waiting``: requests queued before ``submit`` raises QueueFullError. ``max_model_len``: context limit
    (default: the model's max_position_embeddings). ``block_size``: tokens per KV block. KV pool size:
    ``kv_cache_memory_mb`` if set, else on CUDA the free memory after loading times
    ``gpu_memory_utilization``, on the CPU 1024 MB; ``num_kv_blocks`` overrides both with an exact block count
    (tests, exact sizing). ``enable_prefix_caching``: share the KV of identical
    prompt prefixes (images included) between requests. ``max_encoder_slices_per_step``: image slices
    encoded per step while other sequences decode (all at once when none does); unset: a prefill chunk's
    worth, ``max_num_batched_tokens // 64`` (each slice becomes 64 positions). ``attention_backend``:
    "auto", "reference" or "varlen" (attention.py).
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_attention_pairs: int | None = None
    max_waiting: int = 256
    max_model_len: int | None = None
    default_max_tokens: int = 2048
    vision_cache_size: int = 64
    default_max_slice_nums: int | None = None
    block_size: int = 16
    kv_cache_memory_mb: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_encoder_slices_per_step: int | None = None
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "default_max_tokens", "block_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        for name in ("kv_cache_memory_mb", "num_kv_blocks", "max_prefill_attention_pairs",
                     "max_encoder_slices_per_step"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1 (or unset)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("EngineConfig.gpu_memory_utilization must be in (0, 1]")


class Engine:
    def __init__(self, model, tokenizer, image_processor: ImageProcessor, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        cfg = self.config
        self.processor = MiniCPMVProcessor(image_processor, tokenizer)
        self.runner = ModelRunner(model, block_size=cfg.block_size, kv_cache_memory_mb=cfg.kv_cache_memory_mb,
                                  num_kv_blocks=cfg.num_kv_blocks, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                  attention_backend=cfg.attention_backend)  # fmt: skip
        self.block_manager = BlockManager(self.runner.pool.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_prefill_attention_pairs)  # fmt: skip
        self.max_model_len = cfg.max_model_len or model.config.max_position_embeddings
        self.vision_cache = VisionCache(cfg.vision_cache_size)
        self.grammars = GrammarCompilerCache(tokenizer, model.config.vocab_size)
        self.logits_processor = LogitsProcessor(tokenizer, model.config.vocab_size, self.runner.device)
        self._incoming: deque[RequestState] = deque()  # submitted, not yet handed to the scheduler
        self._requests: dict[str, RequestState] = {}
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
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests not handed to the scheduler yet plus sequences waiting for admission (a snapshot: lengths
        only, safe from any thread)."""
        return len(self._incoming) + len(self.scheduler.waiting)

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics: KV blocks, prefix-cache tokens looked up and found, preemptions."""
        blocks = self.block_manager
        return {
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_used": blocks.num_used_blocks,
            "kv_usage": blocks.num_used_blocks / blocks.num_blocks,
            "prefix_cache_queries": blocks.prefix_queries,
            "prefix_cache_hits": blocks.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.num_steps,
            "generated_tokens": self.num_generated_tokens,
        }

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
            if self.num_waiting >= self.config.max_waiting:
                raise QueueFullError(f"{self.num_waiting} requests are already waiting; retry later")
            self._requests[request.request_id] = state
            self._incoming.append(state)
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
            images = [self._image_input(image, max_slice_nums, i) for i, image in enumerate(pil_images)]
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
        if self.block_manager.blocks_for(prompt_len + max_tokens) > self.block_manager.num_blocks:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more than this "
                f"engine's KV cache of {self.runner.pool.num_slots} tokens"
            )
        grammar = None
        if params.response_format is not None:
            try:
                grammar = self.grammars.compile(params.response_format)
            except ValueError as e:
                raise InvalidRequestError(str(e)) from e
        state = RequestState(request, encoded.input_ids, encoded.image_bounds, images, max_tokens, callback)
        state.prompt = prompt
        state.content_spans = self._content_spans(images, encoded.image_bounds)
        self._vision_ready(state)
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

    def _image_input(self, image, max_slice_nums, index: int) -> ImageInput:
        """The image's cached layout and embeddings, or its slices. An image opened lazily (header only) is
        decoded here, on a miss only; a file that does not decode is the request's error."""
        key = image_key(image, max_slice_nums)
        cached = self.vision_cache.get(key)
        if cached is not None:
            return ImageInput(key, cached.layout, cached.embeds)
        try:
            image.load()
        except (OSError, SyntaxError) as e:
            raise ValueError(f"image {index}: not a decodable image ({type(e).__name__}: {e})") from e
        return ImageInput(key, self.processor.image_processor.preprocess(image, max_slice_nums))

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return generator

    @staticmethod
    def _content_spans(images: list[ImageInput], bounds: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """(start, end, "<image key>#<slice>") of every slice placeholder span, in prompt order."""
        spans, k = [], 0
        for image in images:
            for chunk in range(image.processed.num_chunks):
                start, end = bounds[k]
                spans.append((int(start), int(end), f"{image.key}#{chunk}"))
                k += 1
        return spans

    def _vision_ready(self, state: RequestState) -> None:
        """Once every image of ``state`` is encoded: the embedding rows for its placeholder positions."""
        if not state.images or any(image.embeds is None for image in state.images):
            return
        positions = torch.cat([torch.arange(start, end) for start, end, _ in state.content_spans])
        embeds = torch.cat([image.embeds for image in state.images])
        state.vision_embeds = embeds.reshape(-1, embeds.shape[-1])
        state.vision_positions = positions
        state.vision_end = int(positions.max()) + 1

    # ---------------------------------------------------------------- the loop (engine thread)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._incoming and not self.scheduler.has_work():
                    self._cv.wait()
                if self._stop:
                    return
                while self._incoming:
                    self.scheduler.add(self._incoming.popleft().sequences)
            batch = []
            try:
                self._drop_cancelled()
                self._encode_images()
                batch = self.scheduler.schedule(lambda seq: seq.request.images_ready)
                if batch:
                    logits = self.runner.execute(batch)
                    self.num_steps += 1
                    self.scheduler.computed(batch)
                    self._process([entry.seq for entry in batch if entry.sample], logits)
            except Exception as e:  # a failed step fails its requests, never the engine
                logger.exception("engine step failed")
                states = {entry.seq.request for entry in batch} or {s.request for s in self.scheduler.running}
                for state in states:
                    for seq in state.sequences:
                        self.scheduler.finish(seq)
                    self._finish_request(state, FINISH_ERROR, f"internal error: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        with self._cv:  # submit() adds to _requests from other threads
            cancelled = [s for s in self._requests.values() if s.cancelled.is_set()]
        for state in cancelled:
            for seq in state.sequences:
                self.scheduler.finish(seq)
            self._finish_request(state, FINISH_CANCELLED)

    def _finish_request(self, state: RequestState, reason: str, error: str | None = None) -> None:
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = reason
                state.emit(Delta(state.request_id, seq.index, seq.detokenizer.flush() if not error else "", [],
                                 seq.prompt_len, len(seq.output_ids), reason, None, error))
        with self._cv:
            self._requests.pop(state.request_id, None)

    def _encode_images(self) -> None:
        """Encode the next image slices of admitted requests, oldest first: while other sequences decode, a
        prefill chunk's worth (``_encoder_budget``), so that they are held back about as long as by a chunk;
        everything pending when none decodes."""
        states = list(dict.fromkeys(seq.request for seq in self.scheduler.running if not seq.request.images_ready))
        if not states:
            return
        decoding = any(not seq.is_prefilling for seq in self.scheduler.running)
        budget = self._encoder_budget() if decoding else 1 << 30
        work: list[tuple[ImageInput, int, int]] = []  # (image, first slice, slice count)
        for image in (image for state in states for image in state.images if image.embeds is None):
            if budget <= 0:
                break
            first = image.slices_done
            count = min(image.processed.num_chunks - first, budget)
            work.append((image, first, count))
            budget -= count
        pixels = [torch.from_numpy(chunk) for image, first, n in work
                  for chunk in image.processed.chunks[first : first + n]]  # fmt: skip
        sizes = torch.cat([torch.as_tensor(image.processed.tgt_sizes).reshape(-1, 2)[first : first + n]
                           for image, first, n in work])  # fmt: skip
        with torch.inference_mode():
            encoded = self.model.encode_images(pixels, sizes)
        offset = 0
        for image, _, n in work:
            image.encoded.append(encoded[offset : offset + n])
            offset += n
            if image.slices_done == image.processed.num_chunks:
                image.embeds = torch.cat(image.encoded)
                image.encoded = []
                self.vision_cache.put(image.key, image.processed, image.embeds)
                image.processed = replace(image.processed, chunks=[])  # the pixels are no longer needed
        for state in states:
            self._vision_ready(state)

    def _encoder_budget(self) -> int:
        """Slices to encode in a step while others decode: ``max_encoder_slices_per_step`` if set, else a
        prefill chunk's worth counted as vLLM counts encoder work, by the embeddings produced: each slice
        yields ``query_num`` (64) LLM positions, so ``max_num_batched_tokens // 64`` slices (8 at the CPU
        configs' 512, 32 at the GPU configs' 2048: three pages)."""
        if self.config.max_encoder_slices_per_step is not None:
            return self.config.max_encoder_slices_per_step
        return max(1, self.config.max_num_batched_tokens // self.model.config.query_num)

    def _process(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence, emit deltas, retire the finished."""
        choices = self.logits_processor.choose_all(seqs, logits)
        for seq, (token, logprob) in zip(seqs, choices, strict=True):
            delta = self._advance(seq, token, logprob)
            seq.request.emit(delta)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                state = seq.request
                if all(s.finish_reason is not None for s in state.sequences):
                    with self._cv:
                        self._requests.pop(state.request_id, None)
        self.num_generated_tokens += len(seqs)

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

