"""Several Triton endpoints behind one frontend, with the real tritonserver: two endpoints (each a TCP proxy to
the same server, so one can be taken down), the official client, requests routed around the dead one and
spread again once it is back."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.frontend.conftest import TCPProxy

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _triton_status(fe) -> dict[str, dict]:
    body = httpx.get(fe.base_url + "/health/ready", timeout=10).json()
    return {e["endpoint"]: e for e in body.get("triton", [])}


def test_requests_avoid_a_triton_that_is_down_and_return_to_it_when_it_is_back(server, make_frontend):
    proxies = {name: (TCPProxy(_port(server.grpc_url)), TCPProxy(_port(server.http_url))) for name in "ab"}
    for grpc, http_ in proxies.values():
        grpc.up(), http_.up()
    grpc_urls = ",".join(f"127.0.0.1:{g.port}" for g, _ in proxies.values())
    http_urls = ",".join(f"127.0.0.1:{h.port}" for _, h in proxies.values())
    fe = make_frontend(grpc_url=grpc_urls, http_url=http_urls, models="minicpm_v_2_6", triton_probe_interval=0.2)
    client = fe.client()
    a, b = (f"127.0.0.1:{g.port}" for g, _ in proxies.values())
    for _ in range(4):
        assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices
    status = _triton_status(fe)
    assert status[a]["requests"] == 2 and status[b]["requests"] == 2  # idle servers take turns

    for proxy in proxies["a"]:
        proxy.down()
    try:
        for _ in range(4):  # every request answered: the first one that meets a is retried on b
            assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices
        status = _triton_status(fe)
        assert status[a]["up"] is False and status[a]["requests"] == 2 and status[b]["requests"] == 6
    finally:
        for proxy in proxies["a"]:
            proxy.up()
    deadline = time.monotonic() + 60
    while not _triton_status(fe)[a]["up"]:  # the probe brings it back
        assert time.monotonic() < deadline, "the endpoint never came back"
        time.sleep(0.2)
    for _ in range(20):  # back in the rotation (its gRPC channel may still be reconnecting for a moment)
        assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices
        if _triton_status(fe)[a]["requests"] > 2:
            break
    assert _triton_status(fe)[a]["requests"] > 2
    for grpc, http_ in proxies.values():
        grpc.down(), http_.down()
