"""The frontend's Prometheus metrics (GET /metrics) through the real stack. Each test starts a frontend of its
own, so its counters start at zero: exact values, and every test passes alone and in any order."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest

from tests.frontend.conftest import TCPProxy
from tests.frontend.helpers import metric

pytestmark = pytest.mark.slow

MODEL = "minicpm_v_2_6"
HI = [{"role": "user", "content": "hi"}]
LONG = {"max_tokens": 3000, "temperature": 0, "extra_body": {"ignore_eos": True}}
REQUESTS = "minicpmv_frontend_requests_total"
DURATION = "minicpmv_frontend_request_duration_seconds"
TTFT = "minicpmv_frontend_time_to_first_token_seconds"


def requests(url: str, status: str, model: str = MODEL) -> float:
    return metric(url, REQUESTS, model=model, status=status)


def assert_one_observation(url: str, histogram: str, upper: float) -> float:
    """The histogram holds exactly one observation, in (0, upper], and it sits in the bucket its sum says."""
    assert metric(url, histogram + "_count", model=MODEL) == 1
    value = metric(url, histogram + "_sum", model=MODEL)
    assert 0 < value <= upper
    for le, count in _buckets(url, histogram).items():
        assert count == (1 if value <= le else 0), (le, count, value)
    return value


def _buckets(url: str, histogram: str) -> dict[float, float]:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    buckets = {}
    for line in body.splitlines():
        if line.startswith(histogram + "_bucket{") and f'model="{MODEL}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    assert float("inf") in buckets and len(buckets) > 2, buckets
    return buckets


def test_metrics_count_requests_tokens_and_latency(make_frontend):
    fe = make_frontend()
    client, url = fe.client(), fe.base_url + "/metrics"
    started = time.perf_counter()
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, extra_body={"ignore_eos": True})
    elapsed = time.perf_counter() - started  # the server's own measure lies inside the client's
    assert requests(url, "200") == 1
    assert metric(url, "minicpmv_frontend_completion_tokens_total", model=MODEL) == answer.usage.completion_tokens == 3
    assert metric(url, "minicpmv_frontend_prompt_tokens_total", model=MODEL) == answer.usage.prompt_tokens > 0
    duration = assert_one_observation(url, DURATION, upper=elapsed)
    assert_one_observation(url, TTFT, upper=duration)  # the first token came before the last

    # A backend error (the model's context length, found by the engine) is counted with its status, streaming
    # or not, and stays out of the latency of answered requests.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=40000, stream=stream)
        assert e.value.code == "context_length_exceeded"
    assert requests(url, "400") == 2
    assert metric(url, DURATION + "_count", model=MODEL) == 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert requests(url, "404", model="no-such-model") == 1
    assert requests(url, "200") == 1
    assert metric(url, "minicpmv_frontend_requests_in_flight", model=MODEL) == 0


def test_timeouts_are_counted_as_504(make_frontend):
    fe = make_frontend(request_timeout=1.5)
    client, url = fe.client(), fe.base_url + "/metrics"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, **LONG)
    assert e.value.status_code == 504
    with pytest.raises(openai.APIError):  # an error event after the first tokens, or a 504 before them
        for _ in client.chat.completions.create(model=MODEL, messages=HI, stream=True, **LONG):
            pass
    assert requests(url, "504") == 2
    assert requests(url, "200") == 0
    assert metric(url, DURATION + "_count", model=MODEL) == 0
    assert metric(url, "minicpmv_frontend_requests_in_flight", model=MODEL) == 0


def test_triton_down_is_counted_as_503(server, make_frontend):
    grpc = TCPProxy(int(server.grpc_url.rsplit(":", 1)[1]))
    http_ = TCPProxy(int(server.http_url.rsplit(":", 1)[1]))
    grpc.up(), http_.up()
    try:
        fe = make_frontend(grpc_url=f"127.0.0.1:{grpc.port}", http_url=f"127.0.0.1:{http_.port}", models=MODEL)
        client, url = fe.client(), fe.base_url + "/metrics"
        assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
        grpc.down(), http_.down()
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert e.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as e:  # before the first token: a plain HTTP error
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream=True)
        assert e.value.status_code == 503
        assert requests(url, "503") == 2
        assert requests(url, "200") == 1
        assert metric(url, DURATION + "_count", model=MODEL) == 1
        assert metric(url, "minicpmv_frontend_requests_in_flight", model=MODEL) == 0
    finally:
        grpc.down(), http_.down()
