"""The interface between the frontend and an inference server. Routers only see these types; the Triton
implementation (:mod:`openai_frontend.triton_client`) and test fakes implement :class:`InferenceBackend`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class BackendError(Exception):
    """A request the backend could not serve. ``kind`` decides the HTTP status (see errors.py)."""

    INVALID = "invalid_request"
    NOT_FOUND = "not_found"  # a LoRA adapter the model does not have
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    CANCELLED = "cancelled"

    def __init__(self, kind: str, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.param = param  # the request field at fault, where the backend says
        self.retry_after: int | None = None  # QUEUE_FULL: seconds a client should wait (load.LoadMonitor)


@dataclass
class GenerateRequest:
    """One chat request for the backend.

    ``messages`` are OpenAI-style messages whose image parts are ``{"type": "image"}`` placeholders;
    ``images`` holds the encoded image files for them, in order. ``sampling`` uses the engine's
    SamplingParams names (plus ``max_slice_nums``).
    """

    request_id: str
    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    logprobs: bool = False
    adapter: str | None = None  # a LoRA adapter of the model (Triton: ``lora_name`` in the sampling parameters)
    # The frontend's own: a tools.ToolPlan when the answer is a tool-call envelope (not sent to the backend).
    tools: Any = None


@dataclass
class TokenLogprob:
    """A token's logprob, as OpenAI's fields: ``bytes`` are the token's own raw bytes (None when it has none,
    e.g. a special token); ``top_logprobs`` holds (token, logprob, bytes) of the most likely alternatives."""

    token: str
    logprob: float
    top_logprobs: list[tuple[str, float, list[int] | None]] = field(default_factory=list)
    bytes: list[int] | None = None


@dataclass
class GenerateChunk:
    """New output of one choice. ``text`` is a delta when streaming, the whole text otherwise.
    Token counts are totals so far for that choice; ``finish_reason`` is set on its last chunk."""

    index: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class LoRAAdapter:
    """A LoRA adapter a model serves: its name, where the server read it from, and what the server says of it
    (``rank``, ``modules``, ``vision``, ``embeddings``, ``resident``, ``loads``, ``requests``)."""

    name: str
    path: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoRAStatus:
    """A model's adapters, and whether it loads more at runtime (its ``lora_dir`` is set)."""

    adapters: list[LoRAAdapter] = field(default_factory=list)
    runtime_loading: bool = False


@dataclass
class EngineStats:
    """A model's engine load, as its server reports it (Triton: the ``stats`` control request): requests waiting
    for admission, sequences running, the fraction of KV-cache blocks in use, the KV pool (blocks, tokens per
    block), the limits (``max_num_seqs`` running, ``max_waiting`` queued), requests finished since the server
    started (their rate is the queue's drain rate), and LoRA adapters (slots, those of running and waiting
    requests). Several servers: their sum (``kv_usage`` the highest, ``block_size`` the first's)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    kv_blocks: int = 0
    block_size: int = 0
    max_num_seqs: int = 0
    max_waiting: int = 0
    finished: int = 0
    max_lora: int = 0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        """Requests the engine takes before refusing: running plus queued."""
        return self.max_num_seqs + self.max_waiting

    @classmethod
    def total(cls, parts: list[EngineStats]) -> EngineStats:
        return cls(waiting=sum(p.waiting for p in parts), running=sum(p.running for p in parts),
                   kv_usage=max((p.kv_usage for p in parts), default=0.0), kv_blocks=sum(p.kv_blocks for p in parts),
                   block_size=next((p.block_size for p in parts if p.block_size), 0),
                   max_num_seqs=sum(p.max_num_seqs for p in parts), max_waiting=sum(p.max_waiting for p in parts),
                   finished=sum(p.finished for p in parts), max_lora=sum(p.max_lora for p in parts),
                   running_adapters=sorted({a for p in parts for a in p.running_adapters}),
                   waiting_adapters=sorted({a for p in parts for a in p.waiting_adapters}))  # fmt: skip


class InferenceBackend(Protocol):
    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Chunks until every choice finished. Raises BackendError. Closing the iterator early cancels
        the request on the server."""
        ...

    async def server_ready(self) -> bool: ...

    async def ready_models(self) -> list[str]:
        """Names of the models ready to serve. Raises BackendError(UNAVAILABLE) when the server is down."""
        ...

    async def lora_status(self, model: str) -> LoRAStatus:
        """The model's LoRA adapters. Raises BackendError (e.g. a model that has no LoRA control)."""
        ...

    async def load_lora(self, model: str, name: str, path: str) -> LoRAAdapter:
        """Load the adapter at ``path`` (the server's check: under its adapter directory) as ``name``. Raises
        BackendError (INVALID with the server's reason when it can't be used)."""
        ...

    async def unload_lora(self, model: str, name: str) -> None:
        """Raises BackendError (NOT_FOUND for an adapter the model does not have, INVALID while in use)."""
        ...

    async def engine_stats(self, model: str) -> EngineStats:
        """The model's engine load now. Raises BackendError (UNAVAILABLE when the server is down)."""
        ...

    async def close(self) -> None: ...
