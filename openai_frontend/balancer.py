"""Several Triton servers behind one frontend: each request goes to the least loaded server that is up.

gRPC keeps one long-lived HTTP/2 connection per server, so a Kubernetes Service in front of several Triton pods
does not spread requests over them; the frontend does, given every endpoint (``MINICPMV_FRONTEND_TRITON_GRPC_URL``
and ``..._HTTP_URL`` as comma-separated lists, paired in order).

* **Least loaded**: the up server with the fewest requests in flight from this frontend (ties: the one chosen
  least recently).
* **Routing around a failure**: a server that is unreachable, not serving the model or whose queue is full
  *before the first token* is skipped and the next one is tried (nothing reached the client yet, so the retry
  is invisible); a failure after the first token goes to the client as it is. An unreachable server is marked
  down.
* **Recovery**: a down server is probed (Triton's ready endpoint) every ``probe_interval`` seconds and takes
  requests again once it answers; if every server is down, requests still try them all.
* **LoRA adapters**: a runtime load or unload goes to every server (a load that one of them refuses is undone on
  the others; a server that is down is skipped, and one that lacks an adapter a request names, because it was down
  at the load or restarted since, is skipped as one lacking the model is); the adapter list is the union.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from openai_frontend.backend import (
    BackendError,
    GenerateChunk,
    GenerateRequest,
    InferenceBackend,
    LoRAAdapter,
    LoRAStatus,
)

logger = logging.getLogger(__name__)

# Failures before the first chunk after which another server is tried.
_RETRY_ELSEWHERE = (BackendError.UNAVAILABLE, BackendError.QUEUE_FULL, BackendError.NOT_FOUND)


@dataclass
class Endpoint:
    name: str
    backend: InferenceBackend
    up: bool = True
    in_flight: int = 0
    last_used: int = 0
    requests: int = 0  # requests that got their first token here


class BalancedBackend:
    """An :class:`InferenceBackend` over several, as the module docstring describes."""

    def __init__(self, backends: dict[str, InferenceBackend], probe_interval: float = 2.0):
        if not backends:
            raise ValueError("at least one backend is needed")
        self.endpoints = [Endpoint(name, backend) for name, backend in backends.items()]
        self.probe_interval = probe_interval
        self._clock = itertools.count(1)
        self._prober: asyncio.Task | None = None

    # ---------------------------------------------------------------- routing

    def _order(self) -> list[Endpoint]:
        """Up endpoints by load (then least recently used), then the down ones as a last resort."""
        return sorted(self.endpoints, key=lambda e: (not e.up, e.in_flight, e.last_used))

    def _mark_down(self, endpoint: Endpoint, error: BackendError) -> None:
        if endpoint.up:
            logger.warning("Triton %s is down (%s); routing around it", endpoint.name, error.message)
        endpoint.up = False
        self._ensure_prober()

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        last: BackendError | None = None
        for endpoint in self._order():
            endpoint.in_flight += 1
            endpoint.last_used = next(self._clock)
            started = False
            try:
                async with contextlib.aclosing(endpoint.backend.generate(model, request)) as chunks:
                    async for chunk in chunks:
                        if not started:
                            started = True
                            endpoint.requests += 1
                            if not endpoint.up:
                                endpoint.up = True
                                logger.info("Triton %s is back", endpoint.name)
                        yield chunk
                return
            except BackendError as e:
                if started or e.kind not in _RETRY_ELSEWHERE:
                    raise
                if e.kind == BackendError.UNAVAILABLE:
                    self._mark_down(endpoint, e)
                last = e
            finally:
                endpoint.in_flight -= 1
        assert last is not None
        raise last

    # ---------------------------------------------------------------- health

    def _ensure_prober(self) -> None:
        if self._prober is None or self._prober.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next request starts it
                self._prober = asyncio.get_running_loop().create_task(self._probe_down())

    async def _probe_down(self) -> None:
        while any(not e.up for e in self.endpoints):
            await asyncio.sleep(self.probe_interval)
            for endpoint in self.endpoints:
                if not endpoint.up and await endpoint.backend.server_ready():
                    endpoint.up = True
                    logger.info("Triton %s is back", endpoint.name)

    async def server_ready(self) -> bool:
        ready = await asyncio.gather(*(e.backend.server_ready() for e in self.endpoints))
        for endpoint, ok in zip(self.endpoints, ready, strict=True):
            if not ok and endpoint.up:
                self._mark_down(endpoint, BackendError(BackendError.UNAVAILABLE, "not ready"))
        return any(ready)

    async def ready_models(self) -> list[str]:
        """Models ready on at least one server; UNAVAILABLE when no server answers."""
        results = await asyncio.gather(*(e.backend.ready_models() for e in self.endpoints), return_exceptions=True)
        answered = [r for r in results if not isinstance(r, BaseException)]
        if not answered:
            error = next(r for r in results if isinstance(r, BaseException))
            raise error if isinstance(error, BackendError) else BackendError(BackendError.UNAVAILABLE, str(error))
        return sorted(set().union(*answered))

    # ---------------------------------------------------------------- LoRA adapters

    async def _on_every_server(self, call) -> list[tuple[Endpoint, object]]:
        """``call(backend)`` on every server at once: (endpoint, result or BackendError) each."""
        results = await asyncio.gather(*(call(e.backend) for e in self.endpoints), return_exceptions=True)
        out = []
        for endpoint, result in zip(self.endpoints, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, BackendError):
                if not isinstance(result, Exception):
                    raise result
                result = BackendError(BackendError.UNAVAILABLE, str(result))
            out.append((endpoint, result))
        return out

    async def lora_status(self, model: str) -> LoRAStatus:
        """The adapters of any server (the first's details of each); an error only when none answers."""
        answers = await self._on_every_server(lambda backend: backend.lora_status(model))
        statuses = [r for _, r in answers if isinstance(r, LoRAStatus)]
        if not statuses:
            raise answers[0][1]
        adapters: dict[str, LoRAAdapter] = {}
        for status in statuses:
            for adapter in status.adapters:
                adapters.setdefault(adapter.name, adapter)
        return LoRAStatus(list(adapters.values()), any(s.runtime_loading for s in statuses))

    async def load_lora(self, model: str, name: str, path: str) -> LoRAAdapter:
        """Loaded on every server that is up. One that refuses it (a bad adapter, a path outside its directory):
        unloaded again from the others and the refusal raised."""
        answers = await self._on_every_server(lambda backend: backend.load_lora(model, name, path))
        loaded = [(e, r) for e, r in answers if isinstance(r, LoRAAdapter)]
        refused = [r for _, r in answers if isinstance(r, BackendError) and r.kind != BackendError.UNAVAILABLE]
        if refused or not loaded:
            for endpoint, _ in loaded if refused else []:
                with contextlib.suppress(BackendError):
                    await endpoint.backend.unload_lora(model, name)
            raise refused[0] if refused else answers[0][1]
        for endpoint, result in answers:
            if isinstance(result, BackendError):
                logger.warning("LoRA adapter %r not loaded on Triton %s: %s", name, endpoint.name, result.message)
        return loaded[0][1]

    async def unload_lora(self, model: str, name: str) -> None:
        """Unloaded from every server that has it; NOT_FOUND when none has it."""
        answers = await self._on_every_server(lambda backend: backend.unload_lora(model, name))
        if any(r is None for _, r in answers):
            failed = [r for _, r in answers if isinstance(r, BackendError) and r.kind == BackendError.INVALID]
            if failed:  # in use on a server: the client tries again (the others now answer not found)
                raise failed[0]
            return
        errors = [r for _, r in answers if isinstance(r, BackendError)]
        raise next((e for e in errors if e.kind != BackendError.NOT_FOUND), errors[0])

    def status(self) -> list[dict]:
        return [{"endpoint": e.name, "up": e.up, "in_flight": e.in_flight, "requests": e.requests}
                for e in self.endpoints]  # fmt: skip

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._prober
        for endpoint in self.endpoints:
            await endpoint.backend.close()
