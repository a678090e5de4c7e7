"""openai_frontend/balancer.py's discovery and affinity, with scripted backends and a stub resolver: servers that
appear in DNS join after their health check and those that vanish drain (a request in flight on one finishes);
a document stays on its server, moves when that server is down or past the load bound, and distinct documents
spread evenly; what a document key is (openai_frontend/routing.py). The real servers: tests/frontend/."""

from __future__ import annotations

import asyncio

import pytest

from openai_frontend.backend import BackendError, EngineStats, GenerateChunk, GenerateRequest
from openai_frontend.balancer import BalancedBackend, balanced
from openai_frontend.routing import MIN_TEXT_CHARS, HashRing, document_key, load_bound
from openai_frontend.settings import Settings

NAME = "minicpmv-triton-headless"
SYSTEM = {"role": "system", "content": "You read scanned documents and answer questions about them."}


class Fake:
    """A backend answering two chunks; ``gate`` (an Event) holds each request open until set; ``error`` fails
    a request before its first chunk."""

    def __init__(self, grpc_url: str = "", http_url: str = "", ready: bool = True):
        self.grpc_url, self.http_url, self.ready = grpc_url, http_url, ready
        self.calls = 0
        self.finished = 0
        self.gate: asyncio.Event | None = None
        self.error: BackendError | None = None
        self.closed = False

    async def generate(self, model, request):
        self.calls += 1
        if self.error is not None:
            raise self.error
        yield GenerateChunk(index=0, text="a")
        if self.gate is not None:
            await self.gate.wait()
        self.finished += 1
        yield GenerateChunk(index=0, text="b", finish_reason="stop")

    async def server_ready(self) -> bool:
        return self.ready

    async def ready_models(self) -> list[str]:
        return ["m"]

    async def engine_stats(self, model) -> EngineStats:
        if not self.ready:
            raise BackendError(BackendError.UNAVAILABLE, "down")
        return EngineStats(waiting=1, running=2, max_num_seqs=4)

    async def close(self) -> None:
        self.closed = True


class Stub:
    """A resolver whose answer the test sets; records every host asked. ``answer`` None: the lookup fails."""

    def __init__(self, *addresses: str):
        self.answer: list[str] | None = list(addresses)
        self.asked: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        if self.answer is None:
            raise OSError("Temporary failure in name resolution")
        return list(self.answer)


class Factory:
    """Makes a Fake per discovered server; ``unready`` addresses start failing their health check."""

    def __init__(self):
        self.made: dict[str, Fake] = {}
        self.unready: set[str] = set()

    def __call__(self, grpc_url: str, http_url: str) -> Fake:
        fake = Fake(grpc_url, http_url, ready=grpc_url.split(":")[0] not in self.unready)
        self.made[grpc_url] = fake
        return fake


def ask(text: str = "hi", image: bytes | None = None, history: tuple = (), system: dict | None = None,
        **kwargs) -> GenerateRequest:
    """A chat request: [system], a first user message (the image, if any, then ``text``), then ``history``."""
    first = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}] if image else text}
    messages = [*([system] if system else []), first, *history]
    return GenerateRequest("r", messages=messages, images=[image] if image else [], **kwargs)


def follow_up(image: bytes, question: str, first: str = "What is this page?") -> GenerateRequest:
    """A later turn of the conversation about ``image``: same opening, another last question."""
    history = ({"role": "assistant", "content": "A page."}, {"role": "user", "content": question})
    return ask(first, image, history, SYSTEM)


def page_on(names, server: str) -> GenerateRequest:
    """A request about a page whose server on the ring of ``names`` is ``server``."""
    for i in range(1000):
        request = ask("What is this page?", f"page {i}".encode(), system=SYSTEM)
        if HashRing(names).walk(document_key(request))[0] == server:
            return request
    raise AssertionError(f"no page for {server}")


async def collect(balancer, request: GenerateRequest | None = None) -> str:
    return "".join([c.text async for c in balancer.generate("m", request or ask())])


async def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


def servers(balancer: BalancedBackend, state: str | None = None) -> set[str]:
    return {s["endpoint"] for s in balancer.status() if state is None or s["state"] == state}


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- discovery


def test_a_dns_name_gives_exactly_the_servers_it_resolves_to_and_a_vanishing_one_finishes_its_requests():
    async def main():
        resolver, factory = Stub("10.0.0.1"), Factory()
        balancer = BalancedBackend(discover=[(f"{NAME}:8001", f"http://{NAME}:8000")], factory=factory,
                                   resolver=resolver, discovery_interval=0.02, probe_interval=0.02)
        assert await collect(balancer) == "ab"  # waits for the first lookup
        assert servers(balancer) == {"10.0.0.1:8001"}
        assert (factory.made["10.0.0.1:8001"].http_url) == "http://10.0.0.1:8000"  # the HTTP entry's port

        factory.unready = {"10.0.0.3"}
        resolver.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        await wait_until(lambda: servers(balancer, "up") == {"10.0.0.1:8001", "10.0.0.2:8001"}, "10.0.0.2 joins")
        assert servers(balancer, "joining") == {"10.0.0.3:8001"}  # found, but its health check fails
        for _ in range(6):
            await collect(balancer)
        assert factory.made["10.0.0.3:8001"].calls == 0  # nothing before it is healthy
        factory.made["10.0.0.3:8001"].ready = True
        await wait_until(lambda: "10.0.0.3:8001" in servers(balancer, "up"), "10.0.0.3 joins once healthy")

        # A request in flight on 10.0.0.1 (a document whose server it is) while the name drops it.
        first = factory.made["10.0.0.1:8001"]
        first.gate, calls = asyncio.Event(), first.calls
        held = balancer.generate("m", page_on(servers(balancer), "10.0.0.1:8001"))
        assert (await anext(held)).text == "a" and first.calls == calls + 1
        resolver.answer = ["10.0.0.2", "10.0.0.3"]
        await wait_until(lambda: servers(balancer, "draining") == {"10.0.0.1:8001"}, "10.0.0.1 drains")
        assert servers(balancer, "up") == {"10.0.0.2:8001", "10.0.0.3:8001"}
        calls = first.calls
        for _ in range(6):
            await collect(balancer)
        assert first.calls == calls and not first.closed  # no new request; the one in flight goes on
        first.gate.set()
        assert [c.text async for c in held] == ["b"] and first.finished >= 1  # completed, not cut
        await wait_until(lambda: first.closed, "closed once drained")
        assert servers(balancer) == {"10.0.0.2:8001", "10.0.0.3:8001"}
        assert set(resolver.asked) == {NAME}
        await balancer.close()
        assert all(f.closed for f in factory.made.values())

    run(main())


def test_an_address_that_comes_back_after_draining_is_a_new_server_and_a_lookup_failure_changes_nothing():
    async def main():
        resolver, factory = Stub("10.0.0.1", "10.0.0.2"), Factory()
        balancer = BalancedBackend(discover=[(f"{NAME}:8001", f"{NAME}:8000")], factory=factory, resolver=resolver,
                                   discovery_interval=0.02, probe_interval=0.02)  # fmt: skip
        await collect(balancer)
        resolver.answer = None  # DNS fails: the servers stay
        asked = len(resolver.asked)
        await wait_until(lambda: len(resolver.asked) > asked + 2, "looked up again")
        assert servers(balancer, "up") == {"10.0.0.1:8001", "10.0.0.2:8001"}
        resolver.answer = ["10.0.0.2"]
        await wait_until(lambda: servers(balancer) == {"10.0.0.2:8001"}, "10.0.0.1 drains and closes")
        old = factory.made["10.0.0.1:8001"]
        resolver.answer = ["10.0.0.1", "10.0.0.2"]
        await wait_until(lambda: servers(balancer, "up") == {"10.0.0.1:8001", "10.0.0.2:8001"}, "back")
        assert old.closed and factory.made["10.0.0.1:8001"] is not old
        resolver.answer = []  # the name has no address left: every server drains
        await wait_until(lambda: not servers(balancer), "all drained")
        with pytest.raises(BackendError, match="no Triton server"):
            await collect(balancer)
        assert not await balancer.server_ready()
        await balancer.close()

    run(main())


def test_ip_literals_are_never_resolved_and_interval_0_resolves_once():
    async def main():
        resolver, factory = Stub("10.0.0.7"), Factory()
        fixed = Fake()
        endpoints = [("192.168.1.5:8001", "192.168.1.5:8000"), ("[fd00::5]:8001", "[fd00::5]:8000"),
                     (f"{NAME}:9001", f"{NAME}:9000")]  # fmt: skip
        balancer = balanced(endpoints, lambda g, h: fixed if g.startswith("192") else factory(g, h),
                            resolver=resolver, discovery_interval=0, probe_interval=0.01)  # fmt: skip
        assert isinstance(balancer, BalancedBackend)
        await collect(balancer)
        await asyncio.sleep(0.1)
        assert resolver.asked == [NAME]  # once, and only the name
        assert servers(balancer) == {"192.168.1.5:8001", "[fd00::5]:8001", "10.0.0.7:9001"}
        assert factory.made["10.0.0.7:9001"].http_url == "10.0.0.7:9000"
        await balancer.close()
        one = balanced([("10.0.0.9:8001", "10.0.0.9:8000")], Fake)  # one IP: the backend itself
        assert isinstance(one, Fake) and one.grpc_url == "10.0.0.9:8001"

    run(main())


def test_the_app_builds_a_discovering_balancer_from_its_settings():
    from openai_frontend.app import _triton

    settings = Settings(triton_grpc_url=f"{NAME}:8001", triton_http_url=f"{NAME}:8000", triton_discovery_interval=3,
                        balancer_affinity=False, balancer_load_factor=2.0)  # fmt: skip
    backend = _triton(settings)  # no event loop: nothing is resolved yet
    assert isinstance(backend, BalancedBackend) and backend.endpoints == []
    assert (backend.discovery_interval, backend.affinity, backend.load_factor) == (3, False, 2.0)
    assert Settings().triton_discovery_interval == 10 and Settings().balancer_affinity
    with pytest.raises(ValueError):
        Settings(balancer_load_factor=0.9)


# ---------------------------------------------------------------- affinity


def four(**options) -> tuple[BalancedBackend, dict[str, Fake], list[str]]:
    fakes = {name: Fake(name) for name in ("10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001", "10.0.0.4:8001")}
    reasons: list[str] = []
    return BalancedBackend(dict(fakes), on_choice=reasons.append, **options), fakes, reasons


def calls(fakes: dict[str, Fake]) -> dict[str, int]:
    return {name: f.calls for name, f in fakes.items() if f.calls}


def test_a_document_stays_on_one_server_across_20_requests_and_every_frontend_picks_the_same():
    async def main():
        balancer, fakes, reasons = four()
        page = b"\x89PNG page 17"
        await collect(balancer, ask("What is this page?", page, system=SYSTEM))
        for i in range(19):
            await collect(balancer, follow_up(page, f"question {i}"))
        (home,) = calls(fakes)  # one server took all 20
        assert reasons == ["affinity"] * 20
        other, other_fakes, _ = four()  # another replica knowing the same servers
        await collect(other, follow_up(page, "again"))
        assert calls(other_fakes) == {home: 1}
        off, off_fakes, off_reasons = four(affinity=False)
        for i in range(20):
            await collect(off, follow_up(page, f"question {i}"))
        assert len(calls(off_fakes)) == 4 and set(off_reasons) == {"least_loaded"}  # without affinity: spread
        await collect(balancer, ask("hi"))
        assert reasons[-1] == "no_key"

    run(main())


def test_a_document_moves_to_the_next_server_on_the_ring_when_its_server_is_down_and_comes_back_after():
    async def main():
        balancer, fakes, reasons = four(probe_interval=0.01)
        page = b"page 3"
        key = document_key(ask("What is this page?", page, system=SYSTEM))
        walk = HashRing(fakes).walk(key)
        await collect(balancer, follow_up(page, "q"))
        assert calls(fakes) == {walk[0]: 1}
        fakes[walk[0]].error = BackendError(BackendError.UNAVAILABLE, "connection refused")
        fakes[walk[0]].ready = False
        assert await collect(balancer, follow_up(page, "q")) == "ab"  # retried, invisibly
        assert reasons[-2:] == ["affinity", "retry"] and fakes[walk[1]].calls == 1  # the next one on the ring
        for _ in range(3):
            await collect(balancer, follow_up(page, "q"))
        assert fakes[walk[0]].calls == 2 and fakes[walk[1]].calls == 4  # down: passed over
        fakes[walk[0]].error, fakes[walk[0]].ready = None, True
        await wait_until(lambda: balancer.endpoints[[e.name for e in balancer.endpoints].index(walk[0])].up, "back")
        await collect(balancer, follow_up(page, "q"))
        assert fakes[walk[0]].calls == 3  # its documents come back
        fakes[walk[0]].error = BackendError(BackendError.QUEUE_FULL, "queue full")
        await collect(balancer, follow_up(page, "q"))
        assert reasons[-1] == "retry" and fakes[walk[1]].calls == 5
        assert {s["endpoint"]: s["up"] for s in balancer.status()}[walk[0]]  # a full queue is not a dead server
        await balancer.close()

    run(main())


def test_a_document_overflows_along_the_ring_past_the_load_bound():
    async def main():
        balancer, fakes, reasons = four()
        page = b"page 9"
        walk = HashRing(fakes).walk(document_key(ask("What is this page?", page, system=SYSTEM)))
        for fake in fakes.values():
            fake.gate = asyncio.Event()
        held = []
        for _ in range(3):  # bounds: ceil(1.25 * 1 / 4) = 1, then ceil(1.25 * 2 / 4) = 1, ceil(1.25 * 3 / 4) = 1
            stream = balancer.generate("m", follow_up(page, "q"))
            assert (await anext(stream)).text == "a"
            held.append(stream)
        assert [fakes[name].calls for name in walk] == [1, 1, 1, 0]
        assert reasons == ["affinity", "affinity_overflow", "affinity_overflow"]
        for fake in fakes.values():
            fake.gate.set()
        for stream in held:
            assert [c.text async for c in stream] == ["b"]
        await collect(balancer, follow_up(page, "q"))
        assert fakes[walk[0]].calls == 2 and reasons[-1] == "affinity"  # the load gone: home again
        assert load_bound(1.25, 0, 4) == 1 and load_bound(1.25, 7, 4) == 3 and load_bound(1.25, 15, 2) == 10

    run(main())


def test_distinct_documents_spread_evenly_over_four_servers():
    async def main():
        balancer, fakes, reasons = four()
        for i in range(1000):
            await collect(balancer, ask("What is this page?", f"page {i}".encode(), system=SYSTEM))
        counts = [f.calls for f in fakes.values()]
        chi2 = sum((c - 250) ** 2 / 250 for c in counts)
        # A single-server choice gives [1000, 0, 0, 0]; uneven arcs would give a large chi-square (3 degrees of
        # freedom: 16.3 at p = 0.001).
        assert min(counts) >= 200 and max(counts) / min(counts) < 1.4 and chi2 < 16.3, counts
        assert set(reasons) == {"affinity"}
        # Consistent: a fifth server takes about a fifth of the documents, each from its old server, none moved
        # between the other four.
        keys = [document_key(ask("What is this page?", f"page {i}".encode(), system=SYSTEM)) for i in range(1000)]
        before = HashRing(fakes)
        after = HashRing([*fakes, "10.0.0.5:8001"])
        moved = [k for k in keys if before.walk(k)[0] != after.walk(k)[0]]
        assert all(after.walk(k)[0] == "10.0.0.5:8001" for k in moved) and 120 < len(moved) < 280

    run(main())


# ---------------------------------------------------------------- keys


def test_document_keys():
    page, other = b"\x89PNG first page", b"\x89PNG second page"
    key = document_key(ask("What is this page?", page, system=SYSTEM))
    assert key is not None and len(key) == 32
    # Same first image, same prompt up to it: the same key, whatever comes after.
    assert document_key(follow_up(page, "And the total?")) == key
    assert document_key(ask("Another question about it", page, system=SYSTEM)) == key
    two = ask("Compare", page, system=SYSTEM)
    two.messages[-1]["content"].insert(1, {"type": "image"})
    two.images.append(other)
    assert document_key(two) == key  # a second image after the first changes nothing before it
    # Another image, system prompt, text before the image, image settings, adapter: another key.
    assert document_key(ask("What is this page?", other, system=SYSTEM)) != key
    assert document_key(ask("What is this page?", page)) != key
    before = ask("What is this page?", page, system=SYSTEM)
    before.messages[-1]["content"].insert(0, {"type": "text", "text": "Read this:"})
    sliced = ask("What is this page?", page, system=SYSTEM)
    sliced.messages[-1]["content"][0]["max_slice_nums"] = 1
    assert len({key, document_key(before), document_key(sliced),
                document_key(ask("What is this page?", page, system=SYSTEM, adapter="invoices")),
                document_key(ask("What is this page?", page, system=SYSTEM, sampling={"max_slice_nums": 2}))}) == 5
    # Text only: the leading messages (system and first user message), when long enough.
    assert document_key(ask("hi")) is None
    assert document_key(ask("hi", system=SYSTEM)) is None  # too little text to be worth keeping together
    long_system = {"role": "system", "content": "You are a careful assistant. " * 20}
    assert len(long_system["content"]) >= MIN_TEXT_CHARS
    text_key = document_key(ask("hi", system=long_system))
    assert text_key is not None
    later = ask("hi", history=({"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Next?"}),
                system=long_system)  # fmt: skip
    assert document_key(later) == text_key  # the conversation keeps its server
    assert document_key(ask("hello", system=long_system)) != text_key  # another conversation: its own
    assert document_key(ask("x" * MIN_TEXT_CHARS)) is not None and document_key(ask("x" * 255)) is None


def test_engine_stats_add_up_over_the_servers_that_answer():
    async def main():
        a, b = Fake(), Fake(ready=False)
        balancer = BalancedBackend({"a": a, "b": b})
        stats = await balancer.engine_stats("m")
        assert (stats.waiting, stats.running, stats.max_num_seqs) == (1, 2, 4)
        b.ready = True
        assert (await balancer.engine_stats("m")).running == 4
        a.ready = b.ready = False
        with pytest.raises(BackendError):
            await balancer.engine_stats("m")

    run(main())
