"""Stand-ins for Triton shared by the frontend's unit tests (test_frontend.py, test_responses.py,
test_batch_runner.py, ...): a fake backend, the app around it, and raw ASGI calls whose client can go away
mid-request, as a closed socket does under uvicorn. tests/frontend/ runs the real stack."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient

from openai_frontend.app import create_app
from openai_frontend.backend import LoRAStatus
from openai_frontend.settings import Settings

MODEL = "minicpm_v_2_6"  # the Triton name; clients may also say "MiniCPM-V-2_6" (an alias)


class ServerOnly:
    """The parts of InferenceBackend besides ``generate``: Triton is up and serves one model, without LoRA adapters."""

    async def server_ready(self):
        return True

    async def ready_models(self):
        return [MODEL]

    async def lora_status(self, model):
        return LoRAStatus()

    async def close(self):
        pass


class FakeBackend(ServerOnly):
    """Answers every request with ``chunks`` (each after ``delay`` s), then raises ``error`` if one is given.

    With ``hold_at=k`` each request waits before its k-th chunk (``len(chunks)``: before its end) until
    :attr:`release` is set; :attr:`waiting` counts the requests waiting there. :attr:`closed` counts the
    request streams that ended, however they ended (finished, failed, cancelled, closed early)."""

    def __init__(self, chunks=(), error=None, delay=0.0, hold_at=None):
        self.chunks = list(chunks)
        self.error = error
        self.delay = delay
        self.hold_at = hold_at
        self.release = asyncio.Event()  # binds to the loop that first waits on it
        self.requests = []
        self.waiting = 0
        self.closed = 0

    async def _hold(self):
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1

    async def generate(self, model, request):
        self.requests.append((model, request))
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.hold_at:
                    await self._hold()
                await asyncio.sleep(self.delay)
                yield chunk
            if self.hold_at == len(self.chunks):
                await self._hold()
            if self.error is not None:
                raise self.error
        finally:
            self.closed += 1


def make_app(backend, **settings) -> FastAPI:
    settings.setdefault("batch_enabled", False)  # no SQLite store or runner unless a test asks for them
    return create_app(Settings(**settings), backend_factory=lambda s: backend)


def app_client(backend, **settings) -> TestClient:
    return TestClient(make_app(backend, **settings), raise_server_exceptions=False)


def sample(app: FastAPI, name: str, **labels) -> float:
    """A Prometheus sample of the app's metrics (0 for a series that was never touched)."""
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def run_with_app(app: FastAPI, scenario: Callable[[FastAPI], Awaitable[object]], timeout: float = 30.0):
    """Runs ``await scenario(app)`` on a fresh event loop, inside the app's lifespan (startup and shutdown)."""

    async def main():
        async with app.router.lifespan_context(app):
            return await asyncio.wait_for(scenario(app), timeout)

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], what: str = "", timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.002)


class Call:
    """One POST straight into the ASGI app. The client goes away when :meth:`disconnect` is called: the app's
    next ``receive()`` answers ``http.disconnect`` (ASGI spec 2.3, as uvicorn serves it)."""

    def __init__(self, app: FastAPI, path: str, body: dict):
        self.app, self.path = app, path
        self.data = json.dumps(body).encode()
        self.messages: list[dict] = []
        self._gone = asyncio.Event()
        self._body_sent = False

    def disconnect(self) -> None:
        self._gone.set()

    async def _receive(self) -> dict:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.data, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        self.messages.append(message)

    async def run(self) -> Call:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(self.data)).encode())]}  # fmt: skip
        await self.app(scope, self._receive, self._send)
        return self

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)

    @property
    def headers(self) -> dict[str, str]:
        start = next((m for m in self.messages if m["type"] == "http.response.start"), {"headers": []})
        return {k.decode().lower(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    @property
    def body_chunks(self) -> int:
        return sum(1 for m in self.messages if m["type"] == "http.response.body" and m.get("body"))

