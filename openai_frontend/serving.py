"""Chat completions: run a converted request on the backend and answer in OpenAI's shapes, as one
``chat.completion`` or as a ``chat.completion.chunk`` SSE stream. Owns the per-request deadline, the
in-flight limit, cancellation when the client goes away, and the request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from openai_frontend import __version__, tools
from openai_frontend.backend import BackendError, GenerateChunk, GenerateRequest, InferenceBackend, TokenLogprob
from openai_frontend.errors import RETRY_AFTER_SECONDS, APIError, to_api_error
from openai_frontend.load import DEFAULT_LIMIT, LoadMonitor
from openai_frontend.metrics import Metrics
from openai_frontend.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageToolCall,
    ChatCompletionResponseMessage,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    FunctionCall,
    TopLogprob,
)
from openai_frontend.settings import Settings

logger = logging.getLogger(__name__)
SYSTEM_FINGERPRINT = f"fp_minicpmv_{__version__}"
_FINISH_REASONS = ("stop", "length")


class ClientDisconnected(Exception):
    pass


def to_logprobs(entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if entries is None:
        return None
    return ChoiceLogprobs(content=[
        ChatCompletionTokenLogprob(
            token=e.token, logprob=e.logprob, bytes=e.bytes,
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=b) for t, lp, b in e.top_logprobs],
        )
        for e in entries
    ])  # fmt: skip


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in _FINISH_REASONS else "stop"


class ChatService:
    def __init__(self, settings: Settings, backend: InferenceBackend, metrics: Metrics,
                 load: LoadMonitor | None = None):  # fmt: skip
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.load = load
        self.in_flight = 0

    def limit(self) -> int:
        """Requests in flight before a 429: MAX_CONCURRENT_REQUESTS, or what the servers accept (0: none)."""
        if self.settings.max_concurrent_requests is not None:
            return self.settings.max_concurrent_requests
        return (self.load.capacity() if self.load is not None else None) or DEFAULT_LIMIT

    def retry_after(self, model: str | None) -> int:
        return self.load.retry_after(model) if self.load is not None else RETRY_AFTER_SECONDS

    async def complete(self, http_request: Request, model: str, served_name: str, request: GenerateRequest,
                       include_usage: bool) -> ChatCompletion | StreamingResponse:  # fmt: skip
        """``model`` is the backend's name, ``served_name`` the one the client used (echoed back)."""
        run = self._admit(model, served_name, request)
        try:
            if not request.stream:
                return await run.collect(http_request)
            first = await run.start()  # errors before the first token are HTTP errors, as OpenAI does
        except BaseException:
            run._exit(499)  # only if it never started: the run's own paths count their status and free the slot
            raise
        return StreamingResponse(run.sse(first, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    def _admit(self, model: str, served_name: str, request: GenerateRequest) -> _Run:
        """A run holding one of the in-flight slots, or 429. The slot is taken here, before any await: a burst
        that arrives together must not all pass the check before the first of them counts itself."""
        limit = self.limit()
        if limit and self.in_flight >= limit:
            self.metrics.requests.labels(served_name, "429").inc()
            raise APIError(429, f"too many requests in flight (limit {limit}); retry later",
                           code="too_many_requests", headers={"Retry-After": str(self.retry_after(None))})
        run = _Run(self, model, served_name, request)
        run._enter()
        return run

    async def open_stream(self, model: str, served_name: str,
                          request: GenerateRequest) -> tuple[_Run, GenerateChunk | None]:  # fmt: skip
        """A stream for another API's event format (the Responses API), under the same limit, deadline and
        metrics as :meth:`complete`: errors before the first token raise here; then iterate
        ``run.chunks(first)`` (which ends the run's accounting, also when the iteration stops early)."""
        run = self._admit(model, served_name, request)
        return run, await run.start()


class _Run:
    """One request's life: in-flight accounting, deadline, metrics."""

    def __init__(self, service: ChatService, model: str, served_name: str, request: GenerateRequest):
        self.s = service
        self.model = model
        self.name = served_name
        self.request = request
        self.started = time.perf_counter()
        self.created = int(time.time())  # one value for the response and all its chunks, as OpenAI's
        self.deadline = asyncio.get_running_loop().time() + service.settings.request_timeout
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens: dict[int, int] = {}
        self._chunks: AsyncIterator[GenerateChunk] | None = None
        self._open = False

    # -- accounting
    def _enter(self) -> None:
        if self._open:
            return
        self._open = True
        self.s.in_flight += 1
        self.s.metrics.in_flight.labels(self.name).inc()

    def _exit(self, status: int) -> None:
        if not self._open:
            return
        self._open = False
        self.s.in_flight -= 1
        m = self.s.metrics
        m.in_flight.labels(self.name).dec()
        m.requests.labels(self.name, str(status)).inc()
        if status == 200:
            m.latency.labels(self.name).observe(time.perf_counter() - self.started)
        m.prompt_tokens.labels(self.name).inc(self.prompt_tokens)
        m.completion_tokens.labels(self.name).inc(sum(self.completion_tokens.values()))

    def _seen(self, chunk: GenerateChunk) -> None:
        if self.first_token_at is None and (chunk.text or chunk.completion_tokens):
            self.first_token_at = time.perf_counter()
            self.s.metrics.ttft.labels(self.name).observe(self.first_token_at - self.started)
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens[chunk.index] = chunk.completion_tokens

    def usage(self) -> CompletionUsage:
        completion = sum(self.completion_tokens.values())
        return CompletionUsage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                               total_tokens=self.prompt_tokens + completion)  # fmt: skip

    # -- the backend stream, with the deadline
    async def _next(self) -> GenerateChunk | None:
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(self._chunks.__anext__(), remaining)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise BackendError(BackendError.TIMEOUT, f"the request took longer than the server's limit of "
                               f"{self.s.settings.request_timeout:g} s", code="timeout") from None  # fmt: skip
        self._seen(chunk)
        return chunk

    async def _close(self) -> None:
        if self._chunks is not None:
            with contextlib.suppress(Exception):
                await self._chunks.aclose()

    async def start(self) -> GenerateChunk | None:
        self._enter()
        self._chunks = self.s.backend.generate(self.model, self.request).__aiter__()
        try:
            return await self._next()
        except BaseException as e:
            if isinstance(e, BackendError) and e.kind == BackendError.QUEUE_FULL and e.retry_after is None:
                e.retry_after = self.s.retry_after(self.model)  # every server was full: when the queue drains
            await self._close()
            self._exit(to_api_error(e).status if isinstance(e, Exception) else 499)
            raise

    async def chunks(self, first: GenerateChunk | None) -> AsyncIterator[GenerateChunk]:
        """``first`` and the rest of the backend's chunks; errors propagate (counted with their status)."""
        status = 499
        try:
            chunk = first
            while chunk is not None:
                yield chunk
                chunk = await self._next()
            status = 200
        except Exception as e:
            status = to_api_error(e).status
            raise
        finally:
            await self._close()
            self._exit(status)

    # -- non-streaming
    async def collect(self, http_request: Request) -> ChatCompletion:
        task = asyncio.ensure_future(self._collect())
        watcher = asyncio.ensure_future(_wait_disconnect(http_request))
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            watcher.cancel()
            return task.result()
        task.cancel()  # the client went away: cancel on the server too
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected

    async def _collect(self) -> ChatCompletion:
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        async for chunk in self.chunks(await self.start()):  # the accounting: start() and chunks()
            texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
            if chunk.logprobs is not None:
                logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                finish[chunk.index] = chunk.finish_reason
        choices = [
            Choice(index=i, message=ChatCompletionResponseMessage(content=texts[i]),
                   logprobs=to_logprobs(logprobs.get(i)) if self.request.logprobs else None,
                   finish_reason=_finish(finish.get(i, "stop")))  # fmt: skip
            if self.request.tools is None else _tool_choice(self.request.tools, i, texts[i], finish.get(i, "stop"))
            for i in sorted(texts)
        ]
        return ChatCompletion(id=self.request.request_id, created=self.created, model=self.name,
                              system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=self.usage())  # fmt: skip

    # -- streaming
    def _chunk(self, choices: list[ChunkChoice], usage: CompletionUsage | None, include_usage: bool) -> str:
        body = ChatCompletionChunk(id=self.request.request_id, created=self.created, model=self.name,
                                   system_fingerprint=SYSTEM_FINGERPRINT, choices=choices,
                                   usage=usage).model_dump()  # fmt: skip
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            del body["usage"]
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    async def sse(self, first: GenerateChunk | None, include_usage: bool) -> AsyncIterator[str]:
        status = 499
        try:
            n = int(self.request.sampling.get("n", 1))
            first_content = "" if self.request.tools is None else None  # not known yet to be content
            yield self._chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=first_content))
                               for i in range(n)], None, include_usage)  # fmt: skip
            chunk = first
            readers: dict[int, tools.EnvelopeReader] = {}
            while chunk is not None:
                if self.request.tools is not None:  # the envelope -> content and tool-call deltas
                    reader = readers.setdefault(chunk.index, tools.EnvelopeReader(self.request.tools))
                    for delta in _tool_deltas(reader.feed(chunk.text)):
                        yield self._chunk([ChunkChoice(index=chunk.index, delta=delta)], None, include_usage)
                    if chunk.finish_reason is not None:
                        reason = reader.finish(_finish(chunk.finish_reason)).finish_reason
                        yield self._chunk([ChunkChoice(index=chunk.index, delta=ChoiceDelta(),
                                                       finish_reason=reason)], None, include_usage)  # fmt: skip
                    chunk = await self._next()
                    continue
                lp = to_logprobs(chunk.logprobs) if self.request.logprobs and chunk.logprobs else None
                if chunk.text or lp is not None:
                    yield self._chunk([ChunkChoice(index=chunk.index, delta=ChoiceDelta(content=chunk.text),
                                                   logprobs=lp)], None, include_usage)  # fmt: skip
                if chunk.finish_reason is not None:
                    yield self._chunk([ChunkChoice(index=chunk.index, delta=ChoiceDelta(),
                                                   finish_reason=_finish(chunk.finish_reason))], None,
                                      include_usage)  # fmt: skip
                chunk = await self._next()
            if include_usage:
                yield self._chunk([], self.usage(), include_usage)
            status = 200
        except Exception as e:  # noqa: BLE001 - becomes an error event; the stream then ends
            error = to_api_error(e)
            status = error.status
            yield f"data: {json.dumps({'error': error.info().model_dump()})}\n\n"
        finally:
            await self._close()
            self._exit(status)
        yield "data: [DONE]\n\n"


def _tool_choice(plan: tools.ToolPlan, index: int, text: str, finish_reason: str) -> Choice:
    reader = tools.EnvelopeReader(plan)
    reader.feed(text)
    outcome = reader.finish(_finish(finish_reason))
    calls = [ChatCompletionMessageToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
             for c in outcome.calls] or None  # fmt: skip
    return Choice(index=index, message=ChatCompletionResponseMessage(content=outcome.content, tool_calls=calls),
                  finish_reason=outcome.finish_reason)  # fmt: skip


def _tool_deltas(events: list) -> list[ChoiceDelta]:
    """Envelope events -> chat deltas, as OpenAI streams them: a call's first delta carries its id, type and
    name with empty arguments; the arguments follow in pieces."""
    deltas = []
    for event in events:
        if isinstance(event, tools.ContentDelta):
            deltas.append(ChoiceDelta(content=event.text))
        elif isinstance(event, tools.CallStarted):
            deltas.append(ChoiceDelta(tool_calls=[{"index": event.index, "id": event.id, "type": "function",
                                                   "function": {"name": event.name, "arguments": ""}}]))  # fmt: skip
        else:
            deltas.append(ChoiceDelta(tool_calls=[{"index": event.index, "function": {"arguments": event.text}}]))
    return deltas


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
