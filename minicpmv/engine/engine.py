"""The generation engine: the request lifecycle around a step loop on one background thread.

Why our own loop rather than transformers' continuous batching: that manager takes token ids
only (no inputs_embeds, so no images without extra machinery) and does not cover per-request
seeds, repetition/presence penalties, grammar-constrained decoding, logprobs and cancellation
the way serving needs them. Ours is small and owns every one of those features.

The parts, as nano-vllm splits them: ``scheduler.py`` decides what each step computes (admission,
chunked prefill under a token budget, preemption), ``block_manager.py`` owns the KV blocks and the
prefix cache, ``kv_pool.py`` the KV tensors (allocated once), ``model_runner.py`` runs a packed step,
``encoder.py`` encodes images a few slices per step, ``sampler.py`` picks tokens,
``output_processor.py`` turns them into text and deltas on a thread of its own, and this file
keeps the lifecycle (limits in ``config.py``): ``submit`` (validation and CPU work on the caller's
thread, so a bad request fails there with an exception), the loop (cancellations, a few image slices
encoded per step, one scheduled step, sampling), ``cancel``, ``shutdown``.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from minicpmv.chat import ChatFormatError, format_chat
from minicpmv.engine.block_manager import BlockManager
from minicpmv.engine.config import EngineConfig, parse_modules, parse_targets
from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.engine.encoder import ImageEncoder
from minicpmv.engine.errors import (
    ENGINE_SHUT_DOWN,
    AdapterNotFoundError,
    ContextLengthError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
)
from minicpmv.engine.lora import AdapterInfo, LoRAManager
from minicpmv.engine.model_runner import ModelRunner
from minicpmv.engine.output_processor import OutputProcessor
from minicpmv.engine.request import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    Delta,
    GenerationRequest,
    GenerationResult,
    RequestHandle,
    RequestState,
    Sequence,
)
from minicpmv.engine.sampler import LogitsProcessor
from minicpmv.engine.scheduler import Scheduler
from minicpmv.engine.structured import GrammarCompilerCache, GrammarState
from minicpmv.engine.vision_cache import VisionCache
from minicpmv.image_processing import ImageProcessor
from minicpmv.lora import AdapterError, LoRAAdapter
from minicpmv.processing import ImageSettings, MiniCPMVProcessor

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, tokenizer, image_processor: ImageProcessor, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        cfg = self.config
        self.processor = MiniCPMVProcessor(image_processor, tokenizer)
        self.max_model_len = cfg.max_model_len or model.config.max_position_embeddings
        self.runner = ModelRunner(model, block_size=cfg.block_size, kv_cache_memory_mb=cfg.kv_cache_memory_mb,
                                  num_kv_blocks=cfg.num_kv_blocks, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                  attention_backend=cfg.attention_backend, cuda_graphs=cfg.cuda_graphs,
                                  max_num_seqs=cfg.max_num_seqs,
                                  cuda_graph_max_len=min(cfg.cuda_graph_max_len, self.max_model_len),
                                  max_model_len=self.max_model_len, kv_cache_dtype=cfg.kv_cache_dtype,
                                  int4_kernel=cfg.int4_kernel,
                                  lora=(cfg.max_loras, cfg.max_lora_rank, parse_targets(cfg.lora_target_modules))
                                  if cfg.lora_enabled else None)  # fmt: skip
        self.block_manager = BlockManager(self.runner.pool.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_prefill_attention_pairs)  # fmt: skip
        self.vision_cache = VisionCache(cfg.vision_cache_size)
        slices = cfg.max_encoder_slices_per_step or max(1, cfg.max_num_batched_tokens // model.config.query_num)
        self.encoder = ImageEncoder(model, image_processor, self.vision_cache, slices)
        self.lora: LoRAManager | None = None
        if cfg.lora_enabled:
            self._start_lora(parse_modules(cfg.lora_modules))
        self.grammars = GrammarCompilerCache(tokenizer, model.config.vocab_size, any_whitespace=cfg.json_any_whitespace)
        self.logits_processor = LogitsProcessor(tokenizer, model.config.vocab_size, self.runner.device)
        self._incoming: deque[RequestState] = deque()  # submitted, not yet handed to the scheduler
        self._requests: dict[str, RequestState] = {}
        self._cv = threading.Condition()
        self._stop = False
        self.num_generated_tokens = 0
        self.num_steps = 0
        self._stopped_by_output: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        # Not a bound method: the output processor must not keep the engine alive (Engine <-> OutputProcessor
        # was a reference cycle, which left a dropped engine, its model and its KV pool to the cycle collector).
        self.output = OutputProcessor(on_stopped=functools.partial(_stopped_by_output, self._stopped_by_output,
                                                                   self._cv))  # fmt: skip
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

    # ---------------------------------------------------------------- LoRA adapters

    def _start_lora(self, modules: dict[str, str]) -> None:
        self.lora = LoRAManager(self.model, self.runner.lora, self.config.max_lora_rank)
        manager = self.lora
        self.runner.lora_embeddings = lambda slot: manager.slot_entry(slot).embeddings
        self.encoder.vision_for = lambda name: manager.adapters[name].vision
        self.scheduler.admissible = self._admit_adapter
        self.scheduler.on_leave = self._release_adapter
        for name, path in modules.items():
            self.lora.register(name, path)  # AdapterError: the server does not start, saying why

    def _admit_adapter(self, seq: Sequence) -> bool:
        name = seq.request.request.adapter
        if name is None:
            return True
        slot = self.lora.acquire(name)
        seq.lora_slot = slot
        return slot is not None

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = None

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Register the adapter at ``path`` (under ``lora_dir``) as ``name`` at runtime; AdapterError (a 400)
        when it can't be used or LoRA / runtime loading is off, nothing changed then."""
        if self.lora is None:
            raise AdapterError("LoRA is off on this engine (enable_lora)")
        if not self.config.lora_dir:
            raise AdapterError("loading adapters at runtime is off on this engine (lora_dir is not set)")
        root = Path(self.config.lora_dir).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise AdapterError(f"adapter {name!r}: {path!r} is outside the adapter directory")
        return self.lora.register(name, target)

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` (AdapterNotFoundError if unknown; AdapterError while requests use it)."""
        if self.lora is None or name not in self.lora.names():
            raise AdapterNotFoundError(f"no LoRA adapter {name!r}", param="lora_name")
        with self._cv:  # queued or running requests of it would find it gone
            if any(state.request.adapter == name for state in self._requests.values()):
                raise AdapterError(f"adapter {name!r} is in use by queued or running requests; try again when "
                                   "they finish")  # fmt: skip
            self.lora.unregister(name)

    def adapters(self) -> list[AdapterInfo]:
        return [] if self.lora is None else [self.lora.info(name) for name in self.lora.names()]

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """The LoRA adapters of running sequences and of waiting ones (vLLM's ``running_lora_adapters`` and
        ``waiting_lora_adapters``), sorted; read from another thread (copies of the queues, not locked)."""
        running = {seq.request.request.adapter for seq in list(self.scheduler.running)}
        waiting = {state.request.adapter for state in list(self._incoming)}
        waiting |= {seq.request.request.adapter for seq in list(self.scheduler.waiting)}
        return sorted(a for a in running if a), sorted(a for a in waiting if a)

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics: running and waiting sequences, KV blocks, prefix-cache tokens looked
        up and found, preemptions, steps, generated tokens (read from another thread while the loop runs)."""
        # Read first: the loop counts a step's tokens before it can drop a sequence, so a snapshot in which a
        # sequence has left ``running`` holds every token it generated.
        running, waiting = self.num_running, self.num_waiting
        blocks = self.block_manager
        return {
            "running": running,
            "waiting": waiting,
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
        """Validate and queue ``request``. Deltas go to ``callback`` (called on the output thread,
        output_processor.py) or, without one, to the returned handle. Raises InvalidRequestError (incl.
        ContextLengthError), QueueFullError or EngineStoppedError; nothing is queued then."""
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
            self._finish_request(state, FINISH_ERROR, ENGINE_SHUT_DOWN)
        self.output.drain(timeout)
        self.output.shutdown(timeout)

    # ---------------------------------------------------------------- preparation (caller thread)

    def _prepare(self, request: GenerationRequest, callback) -> RequestState:
        params = request.sampling
        params.validate()
        max_slice_nums = request.max_slice_nums or self.config.default_max_slice_nums
        adapter, salt = self._adapter_of(request)
        try:
            if (request.messages is None) == (request.prompt is None):
                raise InvalidRequestError("give either messages or prompt")
            if request.messages is not None:
                chat = format_chat(request.messages, self.tokenizer, request.images)
                prompt, pil_images, settings = chat.prompt, chat.images, chat.image_settings
            else:
                prompt, pil_images = request.prompt, list(request.images)
                settings = [ImageSettings()] * len(pil_images)
            # Per image: its part's slicing, else the request's, else the config's (the vision cache and the
            # prefix cache key images by content and this value); its part's <image_id> choice.
            slices = [s.max_slice_nums or max_slice_nums for s in settings]
            vision_adapter = adapter.name if adapter is not None and adapter.has_vision else None
            images = [self.encoder.image_input(image, n, i, vision_adapter, salt)
                      for i, (image, n) in enumerate(zip(pil_images, slices, strict=True))]  # fmt: skip
            encoded = self.processor.encode(prompt, [i.processed for i in images], slices,
                                            [s.use_image_id for s in settings])  # fmt: skip
        except (ChatFormatError, ValueError) as e:
            raise InvalidRequestError(str(e)) from e
        prompt_len = len(encoded.input_ids)
        room = self.max_model_len - prompt_len
        max_tokens = params.max_tokens or min(self.config.default_max_tokens, room)
        if max_tokens < 1 or prompt_len + max_tokens > self.max_model_len:
            limit = self.max_model_len
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more than the "
                f"model's context of {limit} tokens",
                param="messages", prompt_tokens=prompt_len, max_tokens=max_tokens, limit=limit)  # fmt: skip
        if self.block_manager.blocks_for(prompt_len + max_tokens) > self.block_manager.num_blocks:
            slots = self.runner.pool.num_slots
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more than this "
                f"engine's KV cache of {slots} tokens",
                param="messages", prompt_tokens=prompt_len, max_tokens=max_tokens, limit=slots)  # fmt: skip
        grammar = None
        if params.response_format is not None:
            try:
                grammar = self.grammars.compile(params.response_format)
            except ValueError as e:
                raise InvalidRequestError(str(e), param="response_format") from e
        state = RequestState(request, encoded.input_ids, encoded.image_bounds, images, max_tokens, callback)
        state.prompt = prompt
        state.cache_salt = None if salt is None else salt.encode()
        state.content_spans = self.encoder.content_spans(images, encoded.image_bounds)
        self.encoder.finish(state)
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            state.sequences.append(Sequence(
                request=state,
                index=index,
                prompt_ids=encoded.input_ids,
                generator=self._generator(seed) if seed is not None and not params.greedy else None,
                detokenizer=IncrementalDetokenizer(self.tokenizer, encoded.input_ids, params.stop),
                grammar=GrammarState(grammar) if grammar is not None else None,
                logprobs=[] if params.logprobs else None,
            ))  # fmt: skip
        return state

    def _adapter_of(self, request: GenerationRequest) -> tuple[LoRAAdapter | None, str | None]:
        """The request's adapter and the salt of its cache keys ("lora:<name>:<uid>"; a name loaded again gets
        a new uid), or (None, None) for the base model."""
        if request.adapter is None:
            return None, None
        if self.lora is None or request.adapter not in self.lora.names():
            raise AdapterNotFoundError(f"no LoRA adapter {request.adapter!r} on this model", param="model")
        with self.lora.lock:
            entry = self.lora.adapters[request.adapter]
            entry.requests += 1
        return entry.adapter, f"lora:{request.adapter}:{entry.uid}"

    def _generator(self, seed: int) -> torch.Generator:
        """A seeded choice's own randomness (the sampler draws unseeded rows from a shared generator)."""
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(seed)
        return generator

    # ---------------------------------------------------------------- the loop (engine thread)

    def _loop(self) -> None:
        if self.runner.device.type == "cuda":  # this instance's GPU (Triton: one per GPU) for CUDA graph replays
            torch.cuda.set_device(self.runner.device)
        while True:
            with self._cv:
                while not self._stop and not self._incoming and not self.scheduler.has_work():
                    self._cv.wait()
                if self._stop:
                    return
                while self._incoming:
                    self.scheduler.add(self._incoming.popleft().sequences)
            while not self._stopped_by_output.empty():  # stop strings, found by the output thread
                self._retire(self._stopped_by_output.get(), "stop")
            batch, pending = [], []
            try:
                self._drop_cancelled()
                running = self.scheduler.running
                pending = list(dict.fromkeys(seq.request for seq in running if not seq.request.images_ready))
                if pending:
                    self.encoder.step(pending, others_decoding=any(not seq.is_prefilling for seq in running))
                pending = []
                batch = self.scheduler.schedule(lambda seq: seq.request.images_ready)
                if batch:
                    logits = self.runner.execute(batch)
                    self.num_steps += 1
                    self.scheduler.computed(batch)
                    self._process([entry.seq for entry in batch if entry.sample], logits)
            except Exception as e:  # a failed step fails its requests, never the engine
                logger.exception("engine step failed")
                # The requests of the failed part: those being encoded, or those in the step (the pool's other
                # blocks are intact); the whole running set only if the failure came from elsewhere.
                states = set(pending) or {entry.seq.request for entry in batch}
                states = states or {s.request for s in self.scheduler.running}
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
        self.output.finish(state, reason, error)
        with self._cv:
            self._requests.pop(state.request_id, None)

    def _retire(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        state = seq.request
        if all(s.finish_reason is not None for s in state.sequences):
            with self._cv:
                self._requests.pop(state.request_id, None)

    def _process(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence, hand them to the output thread, retire the finished. Finishes that
        need no text are decided here; stop strings by the output thread (``_stopped_by_output``)."""
        choices = self.logits_processor.choose_all(seqs, logits)  # the step's one device -> host transfer
        items = []
        for seq, (token, logprob) in zip(seqs, choices, strict=True):
            reason = self._advance(seq, token, logprob)
            items.append((seq, token, logprob, reason))
            if reason is not None:
                self._retire(seq, reason)
        self.output.tokens(items)
        self.num_generated_tokens += len(seqs)

    @staticmethod
    def _advance(seq: Sequence, token: int, logprob) -> str | None:
        """Append ``token``; the finish reason it causes, if any (stop token, grammar end, max_tokens)."""
        state = seq.request
        params = state.sampling
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if (token in params.stop_token_ids and not params.ignore_eos) or (
            seq.grammar is not None and seq.grammar.is_terminated()
        ):
            return "stop"
        if len(seq.output_ids) >= state.max_tokens:
            return "length"
        return None


def _stopped_by_output(stopped: queue.SimpleQueue, cv: threading.Condition, seq: Sequence) -> None:
    """Output thread: a stop string ended ``seq``; the engine drops it before its next step."""
    stopped.put(seq)
    with cv:
        cv.notify()
