"""The batch runner: a background task of the frontend process that runs the pending lines of open batches
through the same chat path as ``POST /v1/chat/completions`` (in-process: same validation, limits, metrics and
error bodies), with its own concurrency limit, lower still while interactive requests are in flight.

Crash safety: a line's result is stored (with its state, in one transaction) before it counts; lines are only
picked while pending, so a stored line never runs again; a line that was running when the process died has no
result and runs again after the restart. Only the process holding the data directory's lock runs lines, so two
frontends on one directory never run the same line."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from fastapi import Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers

from openai_frontend import errors
from openai_frontend.batch.storage import StorageError, StoragePolicy
from openai_frontend.batch.store import AsyncStore, PendingLine
from openai_frontend.batch.validation import CHAT_ENDPOINT, RESPONSES_ENDPOINT
from openai_frontend.errors import APIError, to_api_error
from openai_frontend.schemas import ChatCompletionRequest
from openai_frontend.serving import ClientDisconnected

logger = logging.getLogger(__name__)
TRANSIENT = (429, 503)  # the server is busy or Triton is away: the line waits, it does not fail
RETRIED = (500, 504)  # may succeed on a later attempt, up to batch_max_attempts
INTERACTIVE_GRACE = 2.0  # seconds after the last interactive request during which the runner stays small


class _NoClient:
    """Stands for the HTTP request of a line: the app's state for the endpoint function, and a "disconnect" (which
    the chat service watches for) when the line is cancelled."""

    def __init__(self, app_state: Any) -> None:
        self.app = SimpleNamespace(state=app_state)
        self.state = SimpleNamespace()
        self.headers = Headers()
        self.cancelled = asyncio.Event()

    async def receive(self) -> dict:
        await self.cancelled.wait()
        return {"type": "http.disconnect"}


def _endpoints() -> dict[str, tuple[type[BaseModel], Callable[..., Awaitable[Response]]]]:
    from openai_frontend.responses import ResponsesRequest
    from openai_frontend.routers import chat, responses

    return {CHAT_ENDPOINT: (ChatCompletionRequest, chat.create_chat_completion),
            RESPONSES_ENDPOINT: (ResponsesRequest, responses.create_response)}  # fmt: skip


async def run_line(state: Any, endpoint: str, body: dict, client: _NoClient) -> dict:
    """One line's body through the endpoint's own function, in-process: the same validation, conversion, limits,
    metrics and error bodies as over HTTP. Returns the response body; raises APIError (or what the endpoint
    raises, for to_api_error), ClientDisconnected when cancelled."""
    schema, endpoint_function = _endpoints()[endpoint]
    try:
        request = schema.model_validate(body)
    except ValidationError as e:  # as FastAPI's handler would answer it (errors.install)
        message, param = errors._validation_message(RequestValidationError(e.errors()))
        raise APIError(400, message, param=param) from None
    if getattr(request, "stream", False):
        raise errors.invalid("streaming is not available in batches; remove 'stream'", "stream")
    response = await endpoint_function(body=request, request=client, settings=state.settings,
                                       registry=state.registry, chat=state.chat)  # fmt: skip
    if response.status_code == 499:
        raise ClientDisconnected
    return json.loads(response.body)


def _line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def error_result(custom_id: str, error: APIError) -> dict:
    return {"id": _line_id(), "custom_id": custom_id,
            "response": {"status_code": error.status, "request_id": "req_" + secrets.token_hex(12),
                         "body": {"error": error.info().model_dump()}}, "error": None}  # fmt: skip


def expired_result(custom_id: str) -> dict:
    return {"id": _line_id(), "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                      "completion window expired."}}  # fmt: skip


class BatchRunner:
    def __init__(self, state: Any, store: AsyncStore):
        self.state = state
        self.settings = state.settings
        self.store = store
        self.metrics = state.metrics
        self.inflight: dict[tuple[str, int], tuple[asyncio.Task, _NoClient]] = {}  # lines at the model
        self.storing: dict[tuple[str, int], tuple[asyncio.Task, _NoClient]] = {}  # answered, result being stored
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock_file = None
        self._paused_until = 0.0
        self._backoff = 0.5
        self._queue: collections.deque[PendingLine] = collections.deque()
        self._finished: set[tuple[str, int]] = set()  # lines finished since the last refill began
        self._stopping = False
        self._last_interactive = -INTERACTIVE_GRACE
        self._watcher: asyncio.Task | None = None
        self._next_sweep = 0.0
        self._unfinishable: dict[str, float] = {}  # batch id -> when its finish last failed for lack of disk

    # ------------------------------------------------------------ life
    def start(self) -> None:
        self._task = asyncio.create_task(self._main(), name="batch-runner")
        self._watcher = asyncio.create_task(self._watch(), name="batch-runner-watch")

    async def stop(self) -> None:
        """Cancels running lines (they have no stored result, so they run again after the next start)."""
        self._stopping = True
        for task in (self._task, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task, client in list(self.inflight.values()):
            client.cancelled.set()
            task.cancel()
        tasks = [t for t, _ in [*self.inflight.values(), *self.storing.values()]]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._lock_file is not None:
            self._lock_file.close()

    def wake(self) -> None:
        self._wake.set()

    def _take_lock(self) -> bool:
        if self._lock_file is not None:
            return True
        f = open(self.store.sync.data_dir / "runner.lock", "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock_file = f
        logger.info("batch runner active on %s", self.store.sync.data_dir)
        return True

    async def _main(self) -> None:
        while True:
            try:
                if self._take_lock():
                    await self._step()
                    await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the runner must outlive one bad step (logged, retried)
                logger.exception("batch runner step failed")
                await asyncio.sleep(1)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0 if self._lock_file else 2.0)
            self._wake.clear()

    # ------------------------------------------------------------ scheduling
    def _interactive_seen(self) -> bool:
        """True while interactive requests run, and for INTERACTIVE_GRACE seconds after the last one (people send
        requests in bursts: the batch stays small between them). The chat service counts the runner's lines
        too; those not yet inside it only make this undercount, never see interactive traffic that is not."""
        now = time.monotonic()
        if self.state.chat.in_flight > len(self.inflight):
            self._last_interactive = now
        return now - self._last_interactive < INTERACTIVE_GRACE

    def _limit(self) -> int:
        if self._interactive_seen():
            return min(self.settings.batch_concurrency, self.settings.batch_concurrency_busy)
        return self.settings.batch_concurrency

    async def _watch(self) -> None:
        """Samples the interactive load often (a request lasts at least its time to first token) and fills
        slots freed when the grace period ends."""
        while True:
            busy = bool(self.inflight or self._queue)
            if busy and self._lock_file is not None:
                self._dispatch()
            await asyncio.sleep(0.02 if busy else 0.2)

    def _batch_inflight(self, batch_id: str) -> list[tuple[asyncio.Task, _NoClient]]:
        return [v for (b, _), v in [*self.inflight.items(), *self.storing.items()] if b == batch_id]

    def _stop_lines(self, batch_id: str) -> bool:
        """Drops the batch's queued lines and cancels its running ones; True while some still run."""
        self._queue = collections.deque(x for x in self._queue if x.batch_id != batch_id)
        running = self._batch_inflight(batch_id)
        for _, client in running:
            client.cancelled.set()
        return bool(running)

    async def _step(self) -> None:
        now = time.time()
        for batch in await self.store.active_batches():
            status, batch_id = batch["status"], batch["id"]
            if batch["errors"] and status in ("validating", "in_progress"):  # stopped: out of storage
                if not self._stop_lines(batch_id):
                    await self._finish(batch_id, "failed")
            elif status == "validating":
                await self.store.set_status(batch_id, "in_progress", only_from=("validating",))
            elif status == "cancelling":
                if not self._stop_lines(batch_id):
                    await self._finish(batch_id, "cancelled")
            elif status == "in_progress" and batch["expires_at"] and now >= batch["expires_at"]:
                if not self._stop_lines(batch_id):
                    await self.store.expire_pending(batch_id, expired_result)
                    await self._finish(batch_id, "expired")
            elif status == "in_progress":
                if not self._batch_inflight(batch_id) and await self.store.pending_count(batch_id) == 0:
                    await self.store.set_status(batch_id, "finalizing", only_from=("in_progress",))
                    await self._finish(batch_id, "completed")
            elif status == "finalizing":
                await self._finish(batch_id, "completed")
        await self._refill()
        self._dispatch()

    async def _refill(self) -> None:
        """Reads the next pending lines into the queue. Lines that finish while the read runs are left out even
        if the read still saw them pending (their results were being stored): a stored line never runs again."""
        self._finished = set()
        lines = await self.store.pending_lines(8 * self.settings.batch_concurrency + len(self.inflight))
        skip = self.inflight.keys() | self.storing.keys() | self._finished
        self._queue = collections.deque(x for x in lines if (x.batch_id, x.line) not in skip)

    def _dispatch(self) -> None:
        """Starts queued lines up to the limit; called from the loop and whenever a line finishes, so a freed slot
        is used at once."""
        if time.monotonic() < self._paused_until:
            return
        free = self._limit() - len(self.inflight)
        while free > 0 and self._queue:
            line = self._queue.popleft()
            key = (line.batch_id, line.line)
            if key in self.inflight or key in self.storing or key in self._finished:
                continue
            client = _NoClient(self.state)
            task = asyncio.create_task(self._run_line(line, client))
            task.add_done_callback(lambda _t, key=key: self._done(key))
            self.inflight[key] = (task, client)
            self.metrics.batch_lines_in_flight.inc()
            free -= 1

    def _release(self, key: tuple[str, int]) -> None:
        """The model has answered: the slot goes to the next line while this one's result is being stored (a
        commit waits for the disk; lines of equal length finish together and would queue for it)."""
        entry = self.inflight.pop(key, None)
        if entry is not None:
            self.storing[key] = entry
            self.metrics.batch_lines_in_flight.dec()
            if not self._stopping:
                self._dispatch()

    def _done(self, key: tuple[str, int]) -> None:
        if self.inflight.pop(key, None) is not None:
            self.metrics.batch_lines_in_flight.dec()
        self.storing.pop(key, None)
        self._finished.add(key)
        if self._stopping:
            return
        self._dispatch()
        if len(self._queue) < self.settings.batch_concurrency:
            self._wake.set()  # refill before the queue runs dry (the read waits behind commits), or finalize

    async def _sweep(self) -> None:
        """Deletes expired files every ``batch_sweep_interval`` seconds (only the process that runs lines)."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.settings.batch_sweep_interval
        deleted = await self.store.sweep()
        if deleted:
            self.metrics.batch_files_expired.inc(len(deleted))
            logger.info("deleted %d expired file(s)", len(deleted))
        self.metrics.batch_storage_bytes.set(await self.store.disk_used())

    async def _finish(self, batch_id: str, status: str) -> None:
        if time.monotonic() < self._unfinishable.get(batch_id, -1e9) + 30:
            return  # its files did not fit a moment ago: try again later, not every step
        try:
            batch = await self.store.finish(batch_id, status)
        except StorageError as e:
            self._unfinishable[batch_id] = time.monotonic()
            logger.warning("batch %s can't be finished (%s); trying again in 30 s", batch_id, e.message)
            return
        self._unfinishable.pop(batch_id, None)
        if batch is not None and batch["status"] == status:
            self.metrics.batches.labels(status).inc()
            logger.info("batch %s %s: %d completed, %d failed of %d", batch_id, status, batch["completed"],
                        batch["failed"], batch["total"])  # fmt: skip

    # ------------------------------------------------------------ one line
    async def _run_line(self, line: PendingLine, client: _NoClient) -> None:
        try:
            body = await self._read_body(line)
            completion = await run_line(self.state, line.endpoint, body, client)
        except ClientDisconnected:
            return  # cancelled (batch cancelled or expired, or shutdown): no result, the line stays pending
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes the line's error (or a retry)
            await self._failed(line, to_api_error(e))
            return
        self._backoff = 0.5
        self._release((line.batch_id, line.line))
        usage = completion.get("usage") or {}
        result = {"id": _line_id(), "custom_id": line.custom_id,
                  "response": {"status_code": 200, "request_id": completion["id"], "body": completion},
                  "error": None}  # fmt: skip
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))  # chat completions / responses
        output = usage.get("completion_tokens", usage.get("output_tokens", 0))
        await self._record(line, "completed", result, prompt, output)

    async def _record(self, line: PendingLine, state: str, result: dict, prompt: int = 0, output: int = 0) -> None:
        """Stores a line's result; one that the storage can't take stops its batch (the store marks it; the next
        step cancels its other lines and ends it "failed" with the results stored so far)."""
        try:
            stored = await self.store.record(line.batch_id, line.line, state, result, prompt, output)
        except StorageError as e:
            self.metrics.batch_storage_refusals.labels(e.code).inc()
            logger.warning("batch %s stopped: %s", line.batch_id, e.message)
            self._wake.set()
            return
        if stored:
            self.metrics.batch_lines.labels(state).inc()

    async def _read_body(self, line: PendingLine) -> dict:
        path = self.store.sync.file_path(line.input_file_id)

        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(line.offset)
                return f.read(line.length)

        try:
            raw = await asyncio.to_thread(read)
        except OSError:
            raise APIError(500, "the batch's input file is no longer readable", type="internal_error") from None
        return json.loads(raw)["body"]  # checked at upload: a JSON object with an object "body"

    async def _failed(self, line: PendingLine, error: APIError) -> None:
        if error.status in TRANSIENT:
            self._paused_until = time.monotonic() + self._backoff  # everyone waits a little: the server is full
            self._backoff = min(self._backoff * 2, 30.0)
            return
        self._release((line.batch_id, line.line))
        if error.status in RETRIED and line.attempts + 1 < self.settings.batch_max_attempts:
            await self.store.add_attempt(line.batch_id, line.line)
            return
        await self._record(line, "failed", error_result(line.custom_id, error))


def start_batches(state: Any) -> None:
    """In the app's lifespan: open the store (schema created or migrated) and start the runner."""
    state.batch_store = state.batch_runner = None
    if not state.settings.batch_enabled:
        return
    from openai_frontend.batch.store import Store

    settings = state.settings
    policy = StoragePolicy(max_bytes=settings.batch_max_disk_bytes,
                           max_tenant_bytes=settings.batch_max_tenant_disk_bytes or None,
                           file_expiry=settings.batch_file_expiry)  # fmt: skip
    state.batch_store = AsyncStore(Store(settings.batch_data_dir, settings.batch_db_path or None, policy))
    state.batch_runner = BatchRunner(state, state.batch_store)
    state.batch_runner.start()


async def stop_batches(state: Any) -> None:
    if getattr(state, "batch_runner", None) is not None:
        await state.batch_runner.stop()
        state.batch_store.close()
