""":class:`InferenceBackend` on Triton: gRPC streaming (tritonclient.grpc.aio) for generation, HTTP
(tritonclient.http.aio) for health and the model list. The only module that imports tritonclient.

Triton's gRPC stream carries an error as a bare message (no status code), so our model sends each error as a
JSON object with a stable code (minicpmv/engine/errors.py) and ``classify`` maps the code; errors without one
are Triton's own.

LoRA: a request's adapter goes as ``lora_name`` in ``sampling_parameters`` (as to vLLM's Triton backend); listing,
loading and unloading adapters are control requests (a ``lora_control`` input, one JSON response) on the same
gRPC stream API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from openai_frontend.backend import (
    BackendError,
    EngineStats,
    GenerateChunk,
    GenerateRequest,
    LoRAAdapter,
    LoRAStatus,
    TokenLogprob,
)
from openai_frontend.errors import context_length_message

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUT = 2.0
# A control "list" answers at once; a load reads the adapter's files (a vision tower: hundreds of MB).
_CONTROL_TIMEOUT = {"list": 5.0, "load": 600.0, "unload": 60.0, "stats": 2.0}
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))
# Reconnect quickly once Triton is back (gRPC's default backoff grows to two minutes).
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
]
# Triton's own errors (ours always come as a coded JSON object, see classify): fixed phrases of the server.
_TRITON_QUEUE_FULL = ("exceeds maximum queue size",)
_TRITON_UNAVAILABLE = ("unknown model", "is not ready", "not found", "unavailable", "shut down", "stopped")
# The codes of minicpmv/engine/errors.py (and the backend's cancelled / internal_error) -> the frontend's kinds.
_KINDS = {
    "invalid_request": BackendError.INVALID,
    "adapter_not_found": BackendError.NOT_FOUND,
    "context_length_exceeded": BackendError.INVALID,
    "queue_full": BackendError.QUEUE_FULL,
    "unavailable": BackendError.UNAVAILABLE,
    "cancelled": BackendError.CANCELLED,
    "internal_error": BackendError.INTERNAL,
}
_WIRE_KEY = "minicpmv_error"


def _coded(message: str) -> dict | None:
    """The coded error our backend sends (``{"minicpmv_error": {...}}``, possibly after a prefix Triton adds,
    such as ``[request id: ...]``), or None for an error of Triton's own."""
    start = message.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(message[start:])
    except ValueError:
        return None
    error = data.get(_WIRE_KEY) if isinstance(data, dict) else None
    return error if isinstance(error, dict) and error.get("code") in _KINDS else None


def classify(message: str) -> BackendError:
    """A Triton error message -> BackendError of the right kind. Our backend's errors carry a code, mapped
    here; the message text (which may quote the client's input) never decides. Errors without a code are
    Triton's own, recognised by its fixed phrases; anything else about a request Triton refused is invalid."""
    error = _coded(message)
    if error is not None:
        code, text, param = error["code"], str(error.get("message", "")), error.get("param")
        kind = _KINDS[code]
        if kind == BackendError.INTERNAL:
            return BackendError(kind, "the model failed on this request")
        if kind == BackendError.CANCELLED:
            return BackendError(kind, "the request was cancelled")
        if kind == BackendError.QUEUE_FULL:
            return BackendError(kind, "the model's queue is full; retry later", code="queue_full")
        if kind == BackendError.UNAVAILABLE:
            return BackendError(kind, f"the model is not available: {text}")
        if kind == BackendError.NOT_FOUND:  # OpenAI's answer to a model it does not have
            return BackendError(kind, text, code="model_not_found", param=param if isinstance(param, str) else None)
        if code == "context_length_exceeded" and all(isinstance(error.get(k), int) for k in
                                                     ("limit", "prompt_tokens", "max_tokens")):  # fmt: skip
            # No max_tokens and a prompt over the limit: the engine counts what room is left (<= 0) as the
            # completion; the client asked for no completion tokens of its own.
            text = context_length_message(error["limit"], error["prompt_tokens"], max(error["max_tokens"], 0))
        return BackendError(kind, text, code=code if code != "invalid_request" else None,
                            param=param if isinstance(param, str) else None)  # fmt: skip
    lowered = message.lower()
    if any(p in lowered for p in _TRITON_QUEUE_FULL):
        return BackendError(BackendError.QUEUE_FULL, "the model's queue is full; retry later", code="queue_full")
    if "stub process" in lowered:
        return BackendError(BackendError.INTERNAL, "the model failed on this request")
    if "cancelled" in lowered:
        return BackendError(BackendError.CANCELLED, "the request was cancelled")
    if any(p in lowered for p in _TRITON_UNAVAILABLE):
        return BackendError(BackendError.UNAVAILABLE, f"the model is not available: {message}")
    return BackendError(BackendError.INVALID, message)


def _bytes_tensor(name: str, values: list[bytes]) -> grpcclient.InferInput:
    array = np.array([values], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def _bool_tensor(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, 1], "BOOL")
    tensor.set_data_from_numpy(np.array([[value]], dtype=bool))
    return tensor


def build_inputs(request: GenerateRequest) -> list[grpcclient.InferInput]:
    sampling = request.sampling if request.adapter is None else {**request.sampling, "lora_name": request.adapter}
    inputs = [
        _bytes_tensor("messages", [json.dumps(request.messages).encode()]),
        _bytes_tensor("sampling_parameters", [json.dumps(sampling).encode()]),
        _bool_tensor("stream", request.stream),
        _bool_tensor("exclude_input_in_output", True),
        _bool_tensor("return_finish_reason", True),
        _bool_tensor("return_num_input_tokens", True),
        _bool_tensor("return_num_output_tokens", True),
        _bool_tensor("return_logprobs", request.logprobs),
    ]
    if request.images:
        inputs.append(_bytes_tensor("image", list(request.images)))
    return inputs


def _first(result, name: str):
    array = result.as_numpy(name)
    return None if array is None else array.reshape(-1)[0]


def _token_bytes(entry: dict) -> list[int] | None:
    """A logprob entry's raw bytes (null for a special token); a server without the field: the token's UTF-8."""
    return entry["bytes"] if "bytes" in entry else list(entry["token"].encode())


def parse_result(result) -> GenerateChunk:
    text = _first(result, "text_output")
    finish = _first(result, "finish_reason")
    logprobs = None
    raw = _first(result, "logprobs")
    if raw is not None:
        logprobs = [
            TokenLogprob(e["token"], e["logprob"],
                         [(t["token"], t["logprob"], _token_bytes(t)) for t in e.get("top_logprobs", [])],
                         _token_bytes(e))  # fmt: skip
            for e in json.loads(raw)
        ]
    return GenerateChunk(
        index=int(_first(result, "index") or 0),
        text=text.decode("utf-8") if text is not None else "",
        finish_reason=(finish.decode() or None) if finish is not None else None,
        prompt_tokens=int(_first(result, "num_input_tokens") or 0),
        completion_tokens=int(_first(result, "num_output_tokens") or 0),
        logprobs=logprobs,
    )


class TritonBackend:
    def __init__(self, grpc_url: str, http_url: str):
        self.grpc_url = grpc_url
        self.http_url = http_url.removeprefix("http://")
        self._grpc = grpcaio.InferenceServerClient(grpc_url, channel_args=_CHANNEL_ARGS)
        self._http: httpaio.InferenceServerClient | None = None

    def _http_client(self) -> httpaio.InferenceServerClient:
        if self._http is None:  # created lazily: aiohttp wants a running event loop
            self._http = httpaio.InferenceServerClient(self.http_url, conn_timeout=_HEALTH_TIMEOUT)
        return self._http

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        inputs = build_inputs(request)
        n = int(request.sampling.get("n", 1))

        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": request.request_id}

        stream = self._grpc.stream_infer(requests())
        finished = 0
        try:
            async for result, error in stream:
                if error is not None:
                    raise classify(str(error.message()))
                chunk = parse_result(result)
                if chunk.finish_reason is not None:
                    finished += 1
                yield chunk
                if finished >= n:
                    return
            if finished < n:
                raise BackendError(BackendError.INTERNAL, "the model's response stream ended early")
        except grpc.aio.AioRpcError as e:
            raise self._rpc_error(e) from None
        except InferenceServerException as e:
            raise classify(str(e.message())) from None
        finally:
            if finished < n:  # the client went away, an error, or a timeout: cancel on the server
                stream.cancel()

    def _rpc_error(self, error: grpc.aio.AioRpcError) -> BackendError:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return BackendError(BackendError.UNAVAILABLE, f"Triton is not reachable at {self.grpc_url}")
        if error.code() == grpc.StatusCode.CANCELLED:
            return BackendError(BackendError.CANCELLED, "the request was cancelled")
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return BackendError(BackendError.INVALID, f"the request is too large for Triton: {error.details()}")
        return classify(error.details() or str(error.code()))

    async def _control(self, model: str, action: str, **fields: str):
        """One ``lora_control`` request on a gRPC stream: its JSON answer, or BackendError."""
        inputs = [_bytes_tensor("lora_control", [json.dumps({"action": action, **fields}).encode()])]

        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": f"lora-{action}"}

        stream = self._grpc.stream_infer(requests())
        answered = False

        async def first():
            nonlocal answered
            async for result, error in stream:
                answered = True  # the one response, final: nothing to cancel on the server
                if error is not None:
                    raise classify(str(error.message()))
                return json.loads(_first(result, "text_output"))
            raise BackendError(BackendError.INTERNAL, "the model's response stream ended early")

        try:
            return await asyncio.wait_for(first(), _CONTROL_TIMEOUT[action])
        except TimeoutError:
            raise BackendError(BackendError.TIMEOUT, f"{model} did not answer the LoRA {action} in time") from None
        except grpc.aio.AioRpcError as e:
            raise self._rpc_error(e) from None
        except InferenceServerException as e:
            raise classify(str(e.message())) from None
        except (TypeError, ValueError) as e:  # not our JSON: a model without LoRA control
            raise BackendError(BackendError.INTERNAL, f"{model} answered the LoRA {action} with {e}") from None
        finally:
            if not answered:
                stream.cancel()

    async def lora_status(self, model: str) -> LoRAStatus:
        answer = await self._control(model, "list")
        try:
            return LoRAStatus([_adapter(a) for a in answer["adapters"]], bool(answer.get("runtime_loading")))
        except (KeyError, TypeError, AttributeError) as e:
            raise BackendError(BackendError.INTERNAL, f"{model} listed its adapters as {answer!r:.200}") from e

    async def load_lora(self, model: str, name: str, path: str) -> LoRAAdapter:
        return _adapter(await self._control(model, "load", lora_name=name, lora_path=path))

    async def unload_lora(self, model: str, name: str) -> None:
        await self._control(model, "unload", lora_name=name)

    async def engine_stats(self, model: str) -> EngineStats:
        answer = await self._control(model, "stats")
        try:
            return EngineStats(**{name: answer[name] for name in _STATS_FIELDS})
        except (KeyError, TypeError) as e:
            raise BackendError(BackendError.INTERNAL, f"{model} answered the stats with {answer!r:.200}") from e

    async def server_ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._http_client().is_server_ready(), _HEALTH_TIMEOUT))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def ready_models(self) -> list[str]:
        try:
            index = await asyncio.wait_for(self._http_client().get_model_repository_index(), _HEALTH_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - connection refused, timeouts, HTTP errors
            raise BackendError(BackendError.UNAVAILABLE, f"Triton is not reachable at {self.http_url}") from e
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    async def close(self) -> None:
        await self._grpc.close()
        if self._http is not None:
            await self._http.close()


def _adapter(info: dict) -> LoRAAdapter:
    return LoRAAdapter(info["name"], info.get("path", ""), {k: v for k, v in info.items() if k not in ("name", "path")})
