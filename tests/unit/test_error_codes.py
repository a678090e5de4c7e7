"""Typed errors across the Triton boundary: the engine's errors travel as coded JSON (minicpmv/engine/errors.py)
and the frontend maps the code (openai_frontend/triton_client.py ``classify``), never the message, which may
quote the client's own input. Errors without a code are Triton's own."""

from __future__ import annotations

import pytest

from minicpmv.engine.errors import (
    CANCELLED,
    INTERNAL_ERROR,
    AdapterNotFoundError,
    ContextLengthError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    wire_message,
)
from openai_frontend.backend import BackendError
from openai_frontend.errors import APIError, from_backend
from openai_frontend.triton_client import classify

# Text a client controls (a schema's enum value, an image's name in an error) that once changed the class.
HOSTILE = "request cancelled: model is not ready, unknown model not found, Exceeds maximum queue size, stub process"


@pytest.mark.parametrize(("error", "kind", "status", "code"), [
    (InvalidRequestError(HOSTILE), BackendError.INVALID, 400, None),
    (InvalidRequestError(f"response_format.json_schema.schema is not supported: {HOSTILE}", param="response_format"),
     BackendError.INVALID, 400, None),
    (QueueFullError(f"retry later ({HOSTILE})"), BackendError.QUEUE_FULL, 429, "queue_full"),
    (EngineStoppedError("the engine is shut down"), BackendError.UNAVAILABLE, 503, "unavailable"),
    (AdapterNotFoundError(f"no LoRA adapter '{HOSTILE}'", param="model"), BackendError.NOT_FOUND, 404,
     "model_not_found"),  # OpenAI's answer to a model it does not have
])  # fmt: skip
def test_each_engine_error_keeps_its_class_whatever_its_message_says(error, kind, status, code):
    backend = classify(error.wire())
    assert backend.kind == kind
    api = from_backend(backend)
    assert (api.status, api.code, api.param) == (status, code, error.param)
    if kind in (BackendError.INVALID, BackendError.NOT_FOUND):
        assert api.message == str(error)  # the engine's own words reach the client


def test_the_context_length_error_carries_its_numbers_and_is_restated_in_openais_words():
    error = ContextLengthError("too long", param="messages", prompt_tokens=40, max_tokens=99999, limit=32768)
    api = from_backend(classify(error.wire()))
    assert (api.status, api.code, api.param) == (400, "context_length_exceeded", "messages")
    assert api.message == ("This model's maximum context length is 32768 tokens. However, you requested 100039 "
                           "tokens (40 in the messages, 99999 in the completion). Please reduce the length of the "
                           "messages or completion.")  # fmt: skip
    # No max_tokens and a prompt over the limit: the engine reports the room left (negative) as max_tokens.
    left = ContextLengthError("too long", param="messages", prompt_tokens=5000, max_tokens=-904, limit=4096)
    assert "requested 5000 tokens (5000 in the messages, 0 in the completion)" in from_backend(
        classify(left.wire())).message


@pytest.mark.parametrize(("code", "kind", "status"), [
    (INTERNAL_ERROR, BackendError.INTERNAL, 500),
    (CANCELLED, BackendError.CANCELLED, 499),
])  # fmt: skip
def test_internal_errors_and_cancellations_say_nothing_of_the_message(code, kind, status):
    backend = classify(wire_message(code, f"internal error: ValueError: {HOSTILE}"))
    assert backend.kind == kind and HOSTILE not in backend.message
    assert from_backend(backend).status == status


def test_a_prefix_added_by_triton_does_not_hide_the_code():
    message = "[request id: abc-1] " + InvalidRequestError(HOSTILE).wire()
    assert classify(message).kind == BackendError.INVALID


@pytest.mark.parametrize(("message", "kind"), [
    ("Request for unknown model: 'x' is not found", BackendError.UNAVAILABLE),
    ("Exceeds maximum queue size", BackendError.QUEUE_FULL),
    ("Failed to process the request(s) for model instance 'x', message: Stub process is not healthy.",
     BackendError.INTERNAL),
    ("[request id: abc] unexpected shape for input 'image' for model 'x'", BackendError.INVALID),
    ('{"not ours": 1} and text', BackendError.INVALID),
])  # fmt: skip
def test_errors_of_tritons_own_are_recognised_by_its_fixed_phrases(message, kind):
    assert classify(message).kind == kind


def test_every_429_says_when_to_retry():
    assert APIError(429, "busy").response().headers["retry-after"] == "1"
    assert from_backend(classify("Exceeds maximum queue size")).response().headers["retry-after"] == "1"
    assert "retry-after" not in APIError(400, "bad").response().headers
