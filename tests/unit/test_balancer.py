"""openai_frontend/balancer.py with scripted backends: which server a request goes to, routing around a
failure before the first token (and never after it), recovery by probing. The real servers:
tests/frontend/test_balancer.py."""

from __future__ import annotations

import asyncio

import pytest

from openai_frontend.backend import BackendError, GenerateChunk, GenerateRequest
from openai_frontend.balancer import BalancedBackend
from openai_frontend.settings import Settings


class Scripted:
    """A backend that answers with ``chunks`` tokens, or fails with ``error`` after ``fail_after`` chunks;
    ``gate`` (an Event) holds each request open until set."""

    def __init__(self, chunks: int = 2, error: BackendError | None = None, fail_after: int = 0):
        self.chunks, self.error, self.fail_after = chunks, error, fail_after
        self.ready = True
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def generate(self, model, request):
        self.calls += 1
        for k in range(self.chunks):
            if self.error is not None and k == self.fail_after:
                raise self.error
            if self.gate is not None:
                await self.gate.wait()
            yield GenerateChunk(index=0, text=f"t{k}", finish_reason="stop" if k == self.chunks - 1 else None)

    async def server_ready(self) -> bool:
        return self.ready

    async def ready_models(self) -> list[str]:
        if not self.ready:
            raise BackendError(BackendError.UNAVAILABLE, "down")
        return ["m"]

    async def close(self) -> None:
        self.closed = True


def request() -> GenerateRequest:
    return GenerateRequest("r", messages=[{"role": "user", "content": "hi"}])


async def collect(balancer: BalancedBackend) -> str:
    return "".join([c.text async for c in balancer.generate("m", request())])


def run(coro):
    return asyncio.run(coro)


def test_requests_go_to_the_least_loaded_server():
    async def main():
        a, b = Scripted(), Scripted()
        a.gate = asyncio.Event()
        balancer = BalancedBackend({"a": a, "b": b})
        held = asyncio.ensure_future(collect(balancer))  # stays in flight on a
        while a.calls == 0:
            await asyncio.sleep(0)
        assert await collect(balancer) == "t0t1" and b.calls == 1  # a is busy: b
        assert await collect(balancer) == "t0t1" and b.calls == 2  # still busy
        a.gate.set()
        await held
        assert [e["in_flight"] for e in balancer.status()] == [0, 0]
        await collect(balancer)
        await collect(balancer)
        assert (a.calls, b.calls) == (2, 3)  # idle: taken in turn, least recently used first

    run(main())


@pytest.mark.parametrize("kind", [BackendError.UNAVAILABLE, BackendError.QUEUE_FULL])
def test_a_failure_before_the_first_token_is_retried_on_the_next_server(kind):
    async def main():
        a, b = Scripted(error=BackendError(kind, "no")), Scripted()
        balancer = BalancedBackend({"a": a, "b": b}, probe_interval=60)
        assert await collect(balancer) == "t0t1"
        assert (a.calls, b.calls) == (1, 1)
        status = {e["endpoint"]: e for e in balancer.status()}
        assert status["a"]["up"] is (kind != BackendError.UNAVAILABLE)  # a full queue is not a dead server
        await balancer.close()

    run(main())


def test_a_failure_after_the_first_token_reaches_the_client_and_invalid_requests_are_not_retried():
    async def main():
        a = Scripted(chunks=3, error=BackendError(BackendError.UNAVAILABLE, "lost"), fail_after=1)
        b = Scripted()
        balancer = BalancedBackend({"a": a, "b": b})
        with pytest.raises(BackendError, match="lost"):
            await collect(balancer)
        assert b.calls == 0  # the client already had a token: no silent restart elsewhere
        bad = BalancedBackend({"x": Scripted(error=BackendError(BackendError.INVALID, "bad")), "y": Scripted()})
        with pytest.raises(BackendError, match="bad"):
            await collect(bad)
        assert bad.endpoints[1].backend.calls == 0

    run(main())


def test_a_server_that_was_down_takes_requests_again_once_it_answers_its_probe():
    async def main():
        a, b = Scripted(error=BackendError(BackendError.UNAVAILABLE, "refused")), Scripted()
        a.ready = False
        balancer = BalancedBackend({"a": a, "b": b}, probe_interval=0.01)
        await collect(balancer)
        assert not balancer.endpoints[0].up
        for _ in range(3):
            await collect(balancer)
        assert a.calls == 1  # down: skipped while b is up
        a.error, a.ready = None, True
        deadline = asyncio.get_running_loop().time() + 10
        while not balancer.endpoints[0].up:
            assert asyncio.get_running_loop().time() < deadline, "the probe never brought it back"
            await asyncio.sleep(0.01)
        for _ in range(4):
            await collect(balancer)
        assert (a.calls, b.calls) == (3, 6)  # back: half of the requests again
        await balancer.close()
        assert a.closed and b.closed

    run(main())


def test_when_every_server_is_down_each_is_still_tried_and_the_last_error_is_raised():
    async def main():
        down = BackendError(BackendError.UNAVAILABLE, "refused")
        a, b = Scripted(error=down), Scripted(error=down)
        balancer = BalancedBackend({"a": a, "b": b}, probe_interval=60)
        for _ in range(2):
            with pytest.raises(BackendError, match="refused"):
                await collect(balancer)
        assert (a.calls, b.calls) == (2, 2)
        await balancer.close()

    run(main())


def test_models_are_those_ready_somewhere_and_readiness_needs_one_server():
    async def main():
        a, b = Scripted(), Scripted()
        b.ready = False
        balancer = BalancedBackend({"a": a, "b": b}, probe_interval=60)
        assert await balancer.ready_models() == ["m"] and await balancer.server_ready()
        a.ready = False
        assert not await balancer.server_ready()
        with pytest.raises(BackendError):
            await balancer.ready_models()
        await balancer.close()

    run(main())


def test_endpoint_lists_must_pair_up():
    assert Settings(triton_grpc_url="a:1, b:1", triton_http_url="a:2,b:2").triton_endpoints() == [
        ("a:1", "a:2"), ("b:1", "b:2")]
    with pytest.raises(ValueError, match="same number of servers"):
        Settings(triton_grpc_url="a:1,b:1", triton_http_url="a:2")
