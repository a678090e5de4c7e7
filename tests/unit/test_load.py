"""The engines' load as the frontend reads it (openai_frontend/load.py): the model server protocol's metrics, the
in-flight limit derived from what the servers accept, and Retry-After from the queues' drain rate. Scripted
backends in-process; tests/frontend/test_load.py runs the real stack."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from openai_frontend import load as load_module
from openai_frontend.backend import BackendError, EngineStats
from openai_frontend.load import LoadMonitor
from openai_frontend.metrics import PROTOCOL_METRICS, ProtocolCollector
from tests.unit.fakes import MODEL, Call, FakeBackend, make_app, run_with_app, until
from tests.unit.test_frontend import BODY, CHUNKS


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(**fields) -> EngineStats:
    return EngineStats(**{"max_num_seqs": 4, "max_waiting": 8, "block_size": 16, "kv_blocks": 100, **fields})


class StatsBackend(FakeBackend):
    """A fake server whose engines report ``figures[model]`` (an EngineStats, or a BackendError to raise)."""

    def __init__(self, figures: dict, **kwargs):
        super().__init__(**kwargs)
        self.figures = figures

    async def ready_models(self):
        return sorted(self.figures)

    async def engine_stats(self, model):
        answer = self.figures[model]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def scrape(collector: ProtocolCollector) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def test_two_models_are_one_server_in_the_protocol_metrics(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(load_module.time, "monotonic", clock)
    backend = StatsBackend({"a": stats(waiting=3, running=4, kv_usage=0.25, finished=10),
                            "b": stats(waiting=2, running=1, kv_usage=0.75, max_lora=2, running_adapters=["x"],
                                       waiting_adapters=["y", "z"])})  # fmt: skip
    monitor = LoadMonitor(backend, backend.ready_models, interval=0.5)
    assert scrape(ProtocolCollector(monitor.current)) == {}  # nothing known yet: nothing reported
    asyncio.run(monitor.poll())
    metrics = scrape(ProtocolCollector(monitor.current))
    m = PROTOCOL_METRICS
    assert metrics[m["queued"]] == [({}, 5.0)] and metrics[m["running"]] == [({}, 5.0)]
    assert metrics[m["kv_usage"]] == [({}, 0.75)]  # the fullest engine's: the one that runs out first
    assert metrics[m["cache_info"]] == [({"block_size": "16", "num_gpu_blocks": "200"}, 1.0)]
    ((labels, value),) = metrics[m["lora_info"]]
    assert labels == {"max_lora": "2", "running_lora_adapters": "x", "waiting_lora_adapters": "y,z"} and value > 0
    assert monitor.capacity() == 2 * (4 + 8)

    # Stale figures (the server stopped answering) are not reported, nor used for the limit.
    backend.figures = {"a": BackendError(BackendError.UNAVAILABLE, "down"), "b": BackendError("unavailable", "down")}
    asyncio.run(monitor.poll())
    monkeypatch.setattr(load_module.time, "time", lambda: monitor.updated + 10 * monitor.interval)
    assert scrape(ProtocolCollector(monitor.current)) == {} and monitor.capacity() is None


def test_retry_after_is_the_time_the_queue_ahead_takes_to_drain(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(load_module.time, "monotonic", clock)
    backend = StatsBackend({MODEL: stats(waiting=0, finished=0)})
    monitor = LoadMonitor(backend, backend.ready_models, interval=0.5)
    assert monitor.retry_after(MODEL) == 1  # nothing known: soon
    asyncio.run(monitor.poll())
    for finished in (5, 10, 15, 20):  # 10 requests a second
        clock.now += 0.5
        backend.figures[MODEL] = stats(waiting=30, finished=finished)
        asyncio.run(monitor.poll())
    assert monitor.retry_after(MODEL) == 3 and monitor.retry_after(None) == 3  # 30 waiting at 10/s
    backend.figures[MODEL] = stats(waiting=10_000, finished=25)
    clock.now += 0.5
    asyncio.run(monitor.poll())
    assert monitor.retry_after(MODEL) == 60  # bounded


@pytest.mark.parametrize("explicit", [None, 0])
def test_the_in_flight_limit_is_what_the_servers_accept_unless_set(explicit):
    backend = StatsBackend({MODEL: stats(max_num_seqs=1, max_waiting=1, waiting=4, finished=0)}, chunks=CHUNKS,
                           hold_at=0)  # fmt: skip
    settings = {} if explicit is None else {"max_concurrent_requests": explicit}

    async def scenario(app):
        await until(lambda: app.state.load.capacity() is not None, "the first poll")
        calls = [Call(app, "/v1/chat/completions", BODY) for _ in range(3)]
        tasks = [asyncio.create_task(c.run()) for c in calls]
        await until(lambda: backend.waiting + sum(t.done() for t in tasks) == 3, "admitted or refused")
        refused = [c for c, t in zip(calls, tasks, strict=True) if t.done()]
        backend.release.set()
        await asyncio.gather(*tasks)
        return refused

    refused = run_with_app(make_app(backend, engine_stats_interval=0.05, **settings), scenario)
    if explicit == 0:  # no limit
        assert refused == []
    else:  # 1 running + 1 queued: the third is refused here, with when to come back
        (call,) = refused
        assert call.status == 429 and call.headers["retry-after"].isdigit()


def test_a_full_queue_at_the_server_says_when_to_come_back(monkeypatch):
    backend = StatsBackend({MODEL: stats(waiting=8, finished=0)}, chunks=[],
                           error=BackendError(BackendError.QUEUE_FULL, "the model's queue is full"))  # fmt: skip

    async def scenario(app):
        await until(lambda: app.state.load.capacity() is not None, "the first poll")
        monkeypatch.setattr(app.state.load, "retry_after", lambda model: 7 if model == MODEL else 1)
        return await Call(app, "/v1/chat/completions", BODY).run()

    call = run_with_app(make_app(backend, engine_stats_interval=0.05), scenario)
    assert call.status == 429 and call.headers["retry-after"] == "7"


class BoundedServer(StatsBackend):
    """A server whose engine takes ``room`` requests (held until released) and refuses the rest: queue full."""

    def __init__(self, room: int):
        super().__init__({MODEL: stats(max_num_seqs=room, max_waiting=0, waiting=room, finished=0)}, chunks=CHUNKS,
                         hold_at=0)  # fmt: skip
        self.room = room

    async def generate(self, model, request):
        if self.waiting >= self.room:
            raise BackendError(BackendError.QUEUE_FULL, "the model's queue is full")
        async for chunk in super().generate(model, request):
            yield chunk


def test_a_burst_past_one_servers_queue_spills_to_the_other_and_a_429_comes_only_when_both_are_full():
    from openai_frontend.balancer import BalancedBackend

    servers = {"a:8001": BoundedServer(1), "b:8001": BoundedServer(5)}  # least loaded alone would split 3 and 3
    backend = BalancedBackend(servers, affinity=False)

    async def scenario(app):
        await until(lambda: app.state.load.capacity() == 6, "the first poll")  # both servers' limits, summed
        for server in servers.values():
            server.release = asyncio.Event()
        calls = [Call(app, "/v1/chat/completions", BODY) for _ in range(7)]
        tasks = [asyncio.create_task(c.run()) for c in calls[:6]]
        await until(lambda: sum(s.waiting for s in servers.values()) == 6, "six requests admitted")
        assert [s.waiting for s in servers.values()] == [1, 5]  # a's refusals went to b, unseen by the clients
        app.state.chat.settings.max_concurrent_requests = 0  # past the frontend's own limit: the servers refuse
        await calls[6].run()
        for server in servers.values():
            server.release.set()
        await asyncio.gather(*tasks)
        return calls

    calls = run_with_app(make_app(backend, engine_stats_interval=0.05), scenario)
    assert [c.status for c in calls[:6]] == [200] * 6
    assert calls[6].status == 429 and calls[6].headers["retry-after"].isdigit()
