"""Several Triton servers behind one frontend: each request goes to a server that is up, the one holding its
document's caches if it has a document, else the least loaded one.

gRPC keeps one long-lived HTTP/2 connection per server, so a Kubernetes Service in front of several Triton pods
does not spread requests over them; the frontend does, given every endpoint (``MINICPMV_FRONTEND_TRITON_GRPC_URL``
and ``..._HTTP_URL`` as comma-separated lists, paired in order). One endpoint at an IP address needs no balancer
(``balanced`` returns its backend itself).

* **Discovery**: an endpoint whose gRPC host is a DNS name (e.g. a Kubernetes headless Service,
  ``minicpmv-triton-headless:8001``) stands for every address the name resolves to (A and AAAA records; IPv4 when
  there are any, else IPv6), each its own server: gRPC at ``address:<its port>``, HTTP at ``address:<the port of the
  HTTP entry in the same position>``. The name is resolved again every ``discovery_interval`` seconds
  (``TRITON_DISCOVERY_INTERVAL``, 10; 0: once at start, retried until it answers; while no server is known yet,
  every ``probe_interval`` seconds). A new address joins once its health
  check (``server_ready()``, Triton's ready endpoint) passes, checked every ``probe_interval`` seconds until then.
  An address gone from DNS drains: it takes no new request, the requests in flight on it finish (a failure of
  theirs before the first token still moves them elsewhere), then its connections are closed. A failed lookup
  changes nothing (a DNS hiccup drains no server); an answer with no address drains them all. IP literals are never
  resolved. Requests that arrive before the first lookup (and health checks) wait for it.
* **Affinity** (``BALANCER_AFFINITY``, on by default): a request with a document key (routing.document_key, which
  defines it: the first image's bytes and the prompt up to and through it; without images, the system message and
  first user message when they hold 256 characters or more) goes by consistent hashing with bounded loads
  (Mirrokni, Thorup, Zadimoghaddam): the servers sit at 160 points each on a 64-bit ring (routing.HashRing, placed
  by hashing the server's name, so every frontend replica that knows the same servers agrees; a server that joins
  or leaves moves only the keys of its own arcs), and the key's 64-bit hash walks clockwise from its point over the
  servers that are up, down ones passed over. The first of them takes the request if its requests in flight from
  this frontend are fewer than ceil(c * (total in flight on the up servers + 1) / number of up servers), c =
  ``BALANCER_LOAD_FACTOR`` (1.25); else the next under that bound does. So a document stays on one server while it
  is up and not overloaded, moves to the next on the ring while it is down (and comes back after), and spills to
  the next while its server is over the bound. Requests without a key, and every request with affinity off, go
  least loaded.
* **Least loaded**: the up server with the fewest requests in flight from this frontend (ties: the one chosen
  least recently).
* **Routing around a failure**: a server that is unreachable, not serving the model or whose queue is full
  *before the first token* is skipped and the next one is tried (keyed requests: the next on the ring; others: the
  next least loaded; nothing reached the client yet, so the retry is invisible); a failure after the first token
  goes to the client as it is. An unreachable server is marked down.
* **Recovery**: a down server is probed (Triton's ready endpoint) every ``probe_interval`` seconds and takes
  requests again once it answers; if every server is down, requests still try them all.
* **The choice** of each attempt and its reason (``affinity``: the key's server; ``affinity_overflow``: a later
  server on the ring, the key's being at its bound; ``no_key``: no key, least loaded; ``least_loaded``: affinity
  off; ``retry``: the next server after a failure) is logged at debug level and passed to ``on_choice(reason)``
  (for the counter ``minicpmv_frontend_balancer_choices_total{reason}``).
* **LoRA adapters**: a runtime load or unload goes to every server (a load that one of them refuses is undone on
  the others; a server that is down is skipped, and one that lacks an adapter a request names, because it was down
  at the load, joined or restarted since, is skipped as one lacking the model is); the adapter list is the union.
* **Engine load** (``engine_stats``): the sum over the servers that answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from openai_frontend.backend import (
    BackendError,
    EngineStats,
    GenerateChunk,
    GenerateRequest,
    InferenceBackend,
    LoRAAdapter,
    LoRAStatus,
)
from openai_frontend.routing import MIN_TEXT_CHARS, Address, HashRing, NamedEndpoints, document_key_async, load_bound

logger = logging.getLogger(__name__)

# Failures before the first chunk after which another server is tried.
_RETRY_ELSEWHERE = (BackendError.UNAVAILABLE, BackendError.QUEUE_FULL, BackendError.NOT_FOUND)
REASONS = ("affinity", "affinity_overflow", "least_loaded", "no_key", "retry")
BackendFactory = Callable[[str, str], InferenceBackend]


@dataclass(eq=False)
class Endpoint:
    name: str
    backend: InferenceBackend
    up: bool = True
    in_flight: int = 0
    last_used: int = 0
    requests: int = 0  # requests that got their first token here
    draining: bool = False  # gone from DNS: no new requests, closed once in_flight is 0
    closed: bool = False


def balanced(endpoints: Sequence[tuple[str, str]], factory: BackendFactory, **options) -> InferenceBackend:
    """The backend for these (gRPC, HTTP) endpoints: one server named by its address as it is (``factory``'s
    backend itself), else a :class:`BalancedBackend` (``options``: its keyword arguments)."""
    if len(endpoints) == 1 and Address.parse(endpoints[0][0]).is_ip:
        return factory(*endpoints[0])
    return BalancedBackend.from_endpoints(endpoints, factory, **options)


class BalancedBackend:
    """An :class:`InferenceBackend` over several, as the module docstring describes. ``backends``: servers by
    name, fixed; ``discover``: (gRPC, HTTP) endpoints whose gRPC host is a DNS name, their servers made by
    ``factory(grpc_url, http_url)`` for each address ``resolver(host)`` (sync or async) answers."""

    def __init__(self, backends: dict[str, InferenceBackend] | None = None, probe_interval: float = 2.0, *,
                 discover: Sequence[tuple[str, str]] = (), factory: BackendFactory | None = None,
                 resolver: Callable[[str], Awaitable[list[str]] | list[str]] | None = None,
                 discovery_interval: float = 10.0, affinity: bool = True, load_factor: float = 1.25,
                 min_key_chars: int = MIN_TEXT_CHARS, on_choice: Callable[[str], None] | None = None):  # fmt: skip
        if not backends and not discover:
            raise ValueError("at least one backend is needed")
        if discover and factory is None:
            raise ValueError("discovery needs a backend factory")
        if load_factor < 1:
            raise ValueError("the load factor must be at least 1")
        self.endpoints = [Endpoint(name, backend) for name, backend in (backends or {}).items()]
        self.probe_interval = probe_interval
        self.discovery_interval = discovery_interval
        self.affinity, self.load_factor, self.min_key_chars = affinity, load_factor, min_key_chars
        self.on_choice = on_choice
        self._factory = factory
        self._names = NamedEndpoints(discover, resolver)
        self._pending: dict[str, Endpoint] = {}  # discovered, waiting for their health check
        self._draining: list[Endpoint] = []
        self._closing: set[asyncio.Task] = set()
        self._clock = itertools.count(1)
        self._prober: asyncio.Task | None = None
        self._discovery: asyncio.Task | None = None
        self._from_dns: set[str] = set()  # members that discovery added (the others are fixed)
        self._closed = False
        self._first_round = asyncio.Event()
        if not self._names:
            self._first_round.set()
        self._rebuild_ring()
        self._ensure_discovery()

    @classmethod
    def from_endpoints(cls, endpoints: Sequence[tuple[str, str]], factory: BackendFactory, **options):
        """IP-literal endpoints as fixed servers (named by their gRPC URL), DNS names discovered."""
        fixed = {grpc: factory(grpc, http) for grpc, http in endpoints if Address.parse(grpc).is_ip}
        names = [(grpc, http) for grpc, http in endpoints if not Address.parse(grpc).is_ip]
        return cls(fixed, discover=names, factory=factory, **options)

    # ---------------------------------------------------------------- routing

    def _rebuild_ring(self) -> None:
        self._ring = HashRing(e.name for e in self.endpoints)
        self._by_name = {e.name: e for e in self.endpoints}

    def _order(self) -> list[Endpoint]:
        """Up endpoints by load (then least recently used), then the down ones as a last resort."""
        return sorted(self.endpoints, key=lambda e: (not e.up, e.in_flight, e.last_used))

    def _ring_order(self, key: bytes) -> tuple[list[Endpoint], str]:
        """The key's server under its bound first, then the other up ones in ring order, then the down ones."""
        walk = [self._by_name[name] for name in self._ring.walk(key)]
        up = [e for e in walk if e.up]
        down = [e for e in walk if not e.up]
        if not up:
            return down, "affinity"
        bound = load_bound(self.load_factor, sum(e.in_flight for e in up), len(up))
        chosen = next((e for e in up if e.in_flight < bound), None) or min(up, key=lambda e: e.in_flight)
        reason = "affinity" if chosen is up[0] else "affinity_overflow"
        return [chosen, *(e for e in up if e is not chosen), *down], reason

    async def _choose(self, request: GenerateRequest) -> tuple[list[Endpoint], str]:
        if not self.affinity:
            return self._order(), "least_loaded"
        key = await document_key_async(request, self.min_key_chars)
        if key is None:
            return self._order(), "no_key"
        return self._ring_order(key)

    def _chose(self, request: GenerateRequest, endpoint: Endpoint, reason: str) -> None:
        logger.debug("request %s -> Triton %s (%s)", request.request_id, endpoint.name, reason)
        if self.on_choice is not None:
            try:
                self.on_choice(reason)
            except Exception:  # noqa: BLE001 - a metric must not fail a request
                logger.exception("on_choice failed")

    def _mark_down(self, endpoint: Endpoint, error: BackendError) -> None:
        if endpoint.up:
            logger.warning("Triton %s is down (%s); routing around it", endpoint.name, error.message)
        endpoint.up = False
        self._ensure_prober()

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        await self._discovered()
        order, reason = await self._choose(request)
        last: BackendError | None = None
        for endpoint in order:
            if endpoint.draining:  # gone from DNS since the order was made
                continue
            self._chose(request, endpoint, reason if last is None else "retry")
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
                if endpoint.draining and endpoint.in_flight == 0:
                    self._close_later(endpoint)
        raise last or self._unavailable()

    # ---------------------------------------------------------------- discovery

    def _ensure_discovery(self) -> None:
        if self._names and (self._discovery is None or self._discovery.done()) and not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: the next call starts it
                self._discovery = asyncio.get_running_loop().create_task(self._discover_loop())

    async def _discovered(self) -> None:
        """Wait for the first lookup and health checks, when names are to be resolved."""
        if not self._first_round.is_set():
            self._ensure_discovery()
            await self._first_round.wait()

    async def _discover_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_lookup = loop.time()
        while True:
            try:
                if loop.time() >= next_lookup:
                    answered = await self.rediscover()
                    if self.discovery_interval > 0:  # sooner while no server is known
                        known = self.endpoints or self._pending
                        next_lookup = loop.time() + min(self.discovery_interval, 1e9 if known else self.probe_interval)
                    else:  # once: again only while a name has never answered
                        next_lookup = float("inf") if answered else loop.time() + self.probe_interval
                await self._admit_pending()
            except Exception:  # noqa: BLE001 - e.g. a backend that could not be made: next round
                logger.exception("Triton discovery failed")
                next_lookup = loop.time() + self.probe_interval
            finally:
                self._first_round.set()
            if next_lookup == float("inf") and not self._pending:
                return
            wait = next_lookup - loop.time()
            await asyncio.sleep(max(0.0, min(wait, self.probe_interval) if self._pending else wait))

    async def rediscover(self) -> bool:
        """Resolve every name once and update the servers: new ones wait for their health check, those gone
        drain. True when every name answered."""
        found, every = await self._names.lookup()
        found = {name: urls for name, urls in found.items() if name in self._from_dns or name not in self._by_name}
        for name, (grpc_url, http_url) in found.items():
            if name not in self._by_name and name not in self._pending:
                logger.info("Triton %s found (DNS); it joins once its health check passes", name)
                self._pending[name] = Endpoint(name, self._factory(grpc_url, http_url), up=False)
        for name in [n for n in self._pending if n not in found]:
            self._close_later(self._pending.pop(name))
        gone = [e for e in self.endpoints if e.name in self._from_dns and e.name not in found]
        for endpoint in gone:
            logger.info("Triton %s is gone from DNS; draining (%d in flight)", endpoint.name, endpoint.in_flight)
            endpoint.draining = True
            self._from_dns.discard(endpoint.name)
            self._draining.append(endpoint)
            if endpoint.in_flight == 0:
                self._close_later(endpoint)
        if gone:
            self.endpoints = [e for e in self.endpoints if not e.draining]
            self._rebuild_ring()
        return every

    async def _admit_pending(self) -> None:
        """Health checks of the servers found: those that pass join."""
        pending = list(self._pending.values())
        ready = await asyncio.gather(*(e.backend.server_ready() for e in pending), return_exceptions=True)
        joined = [e for e, ok in zip(pending, ready, strict=True) if ok is True and self._pending.get(e.name) is e]
        for endpoint in joined:
            del self._pending[endpoint.name]
            endpoint.up = True
            self._from_dns.add(endpoint.name)
            self.endpoints.append(endpoint)
            logger.info("Triton %s joined", endpoint.name)
        if joined:
            self._rebuild_ring()

    def _close_later(self, endpoint: Endpoint) -> None:
        """Close a server's backend (drained or never joined) in the background."""
        if endpoint.closed:
            return
        endpoint.closed = True

        async def close() -> None:
            try:
                await endpoint.backend.close()
            except Exception:  # noqa: BLE001
                logger.warning("closing Triton %s failed", endpoint.name, exc_info=True)
            finally:
                if endpoint in self._draining:
                    self._draining.remove(endpoint)
                    logger.info("Triton %s drained and closed", endpoint.name)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ---------------------------------------------------------------- health

    def _ensure_prober(self) -> None:
        if self._prober is None or self._prober.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next request starts it
                self._prober = asyncio.get_running_loop().create_task(self._probe_down())

    async def _probe_down(self) -> None:
        while any(not e.up for e in self.endpoints):
            await asyncio.sleep(self.probe_interval)
            for endpoint in list(self.endpoints):
                if not endpoint.up and await endpoint.backend.server_ready():
                    endpoint.up = True
                    logger.info("Triton %s is back", endpoint.name)

    def _unavailable(self) -> BackendError:
        return BackendError(BackendError.UNAVAILABLE, f"no Triton server found (yet) at {self._names}")

    async def server_ready(self) -> bool:
        await self._discovered()
        endpoints = list(self.endpoints)
        ready = await asyncio.gather(*(e.backend.server_ready() for e in endpoints))
        for endpoint, ok in zip(endpoints, ready, strict=True):
            if not ok and endpoint.up:
                self._mark_down(endpoint, BackendError(BackendError.UNAVAILABLE, "not ready"))
        return any(ready)

    async def ready_models(self) -> list[str]:
        """Models ready on at least one server; UNAVAILABLE when no server answers."""
        answers = await self._on_every_server(lambda backend: backend.ready_models())
        answered = [r for _, r in answers if not isinstance(r, BackendError)]
        if not answered:
            raise answers[0][1]
        return sorted(set().union(*answered))

    async def engine_stats(self, model: str) -> EngineStats:
        """The sum over the servers that answer (EngineStats.total); an error only when none answers."""
        answers = await self._on_every_server(lambda backend: backend.engine_stats(model))
        stats = [r for _, r in answers if isinstance(r, EngineStats)]
        if not stats:
            raise answers[0][1]
        return EngineStats.total(stats)

    # ---------------------------------------------------------------- LoRA adapters

    async def _on_every_server(self, call) -> list[tuple[Endpoint, object]]:
        """``call(backend)`` on every server at once: (endpoint, result or BackendError) each; at least one."""
        await self._discovered()
        endpoints = list(self.endpoints)
        if not endpoints:
            raise self._unavailable()
        results = await asyncio.gather(*(call(e.backend) for e in endpoints), return_exceptions=True)
        out = []
        for endpoint, result in zip(endpoints, results, strict=True):
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
        """Each server: serving (``up`` or not), then those waiting for their health check, then those draining."""
        rows = [(e, "up" if e.up else "down") for e in self.endpoints]
        rows += [(e, "joining") for e in self._pending.values()] + [(e, "draining") for e in self._draining]
        return [{"endpoint": e.name, "up": e.up and not e.draining, "state": state, "in_flight": e.in_flight,
                 "requests": e.requests} for e, state in rows]  # fmt: skip

    async def close(self) -> None:
        self._closed = True
        self._first_round.set()  # nothing waits for a lookup that will not come
        for task in (self._prober, self._discovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for endpoint in [*self.endpoints, *self._pending.values(), *self._draining]:
            if not endpoint.closed:
                endpoint.closed = True
                with contextlib.suppress(Exception):
                    await endpoint.backend.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
