"""Engine errors. Per-request problems are values the transports map to status codes
(InvalidRequestError -> 400 / INVALID_ARG, QueueFullError -> 429 / UNAVAILABLE, ...)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad parameters, images, messages): the client's fault."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context (or the engine's token budget)."""


class QueueFullError(EngineError):
    """Too many requests are waiting; retry later."""


class EngineStoppedError(EngineError):
    """The engine was shut down."""
