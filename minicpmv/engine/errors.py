"""Engine errors, each with a stable machine-readable ``code`` that travels with it across Triton.

Per-request problems are values the transports map to status codes by their code, never by their message
(a message can quote the client's own input): ``invalid_request`` -> 400 / INVALID_ARG,
``context_length_exceeded`` -> 400, ``queue_full`` -> 429 / UNAVAILABLE, ``unavailable`` -> 503,
``internal_error`` -> 500, ``cancelled``.

On the wire (a Triton error's message; Triton's gRPC stream carries no status code) an error is one JSON
object, ``{"minicpmv_error": {"code": ..., "message": ..., "param": ..., <details>}}`` (``wire_message``);
openai_frontend/triton_client.py decodes it, and a test round-trips every code.
"""

from __future__ import annotations

import json
from typing import Any

WIRE_KEY = "minicpmv_error"
INTERNAL_ERROR = "internal_error"
CANCELLED = "cancelled"
UNAVAILABLE = "unavailable"
# The error of every request still unfinished when the engine shuts down (its class: unavailable).
ENGINE_SHUT_DOWN = "the engine was shut down"


class EngineError(RuntimeError):
    """Base class of the engine's errors. ``param``: the request field at fault, where known; ``details``:
    machine-readable facts (numbers) for the transports."""

    code = INTERNAL_ERROR

    def __init__(self, message: str, *, param: str | None = None, **details: Any):
        super().__init__(message)
        self.param = param
        self.details = details

    def wire(self) -> str:
        return wire_message(self.code, str(self), self.param, **self.details)


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad parameters, images, messages): the client's fault."""

    code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context (or the engine's KV cache). Details:
    ``prompt_tokens``, ``max_tokens`` (what was asked or, unset, what was left: <= 0) and ``limit``."""

    code = "context_length_exceeded"


class AdapterNotFoundError(InvalidRequestError):
    """The request names a LoRA adapter this engine has not registered (the frontend answers 404)."""

    code = "adapter_not_found"


class QueueFullError(EngineError):
    """Too many requests are waiting; retry later."""

    code = "queue_full"


class EngineStoppedError(EngineError):
    """The engine was shut down."""

    code = UNAVAILABLE


def wire_message(code: str, message: str, param: str | None = None, **details: Any) -> str:
    return json.dumps({WIRE_KEY: {"code": code, "message": message, "param": param, **details}})
