"""Every failure the SDK can meet, through the real stack: the OpenAI error envelope with the right status,
and the server keeps serving afterwards."""

from __future__ import annotations

import concurrent.futures
import http.server
import re
import threading
import time

import httpx
import openai
import pytest

from tests.frontend.conftest import TCPProxy
from tests.frontend.helpers import data_url, image_part, metric, page

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]
LONG = {"max_tokens": 3000, "temperature": 0, "extra_body": {"ignore_eos": True}}


def error_of(excinfo) -> dict:
    body = excinfo.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the SDK unwraps {"error": {...}}
    return body


def test_more_than_one_system_message_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=[
            {"role": "system", "content": "a"}, {"role": "system", "content": "b"}, *HI])  # fmt: skip
    assert "only one system message" in error_of(e)["message"] and e.value.body["param"] == "messages[1]"


@pytest.mark.parametrize(
    "url, message",
    [
        (data_url(b"this is not an image"), "not a decodable image"),
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "not a decodable image"),
        ("data:image/png;base64,!!!not-base64!!!", "not valid base64"),
        (data_url(page(), "text/plain"), "expected an image"),
        ("file:///etc/passwd", "must be data: URLs"),
        ("http://127.0.0.1:9/x.png", "image URLs are disabled"),
    ],
)
def test_bad_images_are_400_with_the_part_named(client, url, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": url}}]}])  # fmt: skip
    error = error_of(e)
    assert message in error["message"]
    assert error["param"] == "messages[0].content[1].image_url.url"


def test_images_over_the_pixel_limit_are_400(make_frontend):
    fe = make_frontend(max_image_pixels=500 * 500)
    with pytest.raises(openai.BadRequestError) as e:
        fe.client().chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
            {"role": "user", "content": [image_part(page(900, 640))]}])  # fmt: skip
    assert error_of(e)["code"] == "image_too_large"


def test_too_many_images_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
            {"role": "user", "content": [image_part(page(40, 40))] * 17}])  # fmt: skip
    assert error_of(e)["code"] == "too_many_images"


def test_context_too_long_is_400_streaming_or_not(client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=40000, stream=stream)
        error = error_of(e)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        # OpenAI's wording, which clients such as LiteLLM match on
        found = re.fullmatch(r"This model's maximum context length is (\d+) tokens\. However, you requested (\d+) "
                             r"tokens \((\d+) in the messages, (\d+) in the completion\)\. Please reduce the length "
                             r"of the messages or completion\.", error["message"])  # fmt: skip
        assert found, error["message"]
        limit, total, prompt, completion = (int(g) for g in found.groups())
        assert completion == 40000 and total == prompt + completion and 0 < prompt < limit < total


def test_over_long_prompt_names_its_size(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=[{"role": "user", "content": "page " * 40000}])
    error = error_of(e)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    found = re.search(r"maximum context length is (\d+) tokens\. However, you requested (\d+) tokens \((\d+) in "
                      r"the messages, 0 in the completion\)", error["message"])  # fmt: skip
    assert found and int(found[2]) == int(found[3]) > int(found[1]) >= 1000, error["message"]


def test_unsupported_schema_is_400_with_param_response_format(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})  # fmt: skip
    assert error_of(e)["param"] == "response_format" and "frobnicate" in error_of(e)["message"]


@pytest.mark.parametrize("word", ["cancelled", "not found", "the queue is full", "context", "unknown model is not ready",
                                  "Exceeds maximum queue size"])
def test_words_in_a_bad_request_do_not_change_its_class(client, word):
    """The engine's errors cross Triton with a code; text the client wrote (here a schema's type name, quoted in
    the error) cannot turn a 400 into a 499, 503 or 429."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": word}}})  # fmt: skip
    assert error_of(e)["param"] == "response_format" and word in error_of(e)["message"]


@pytest.mark.parametrize("extra", [{"functions": [{"name": "f"}]},
                                   {"logit_bias": {"1": 5}}, {"unknown_field": 1}])  # fmt: skip
def test_unsupported_or_unknown_parameters_are_400(client, extra):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2, extra_body=extra)


def test_invalid_values_are_400_with_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=HI, temperature=5)
    assert error_of(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=[{"role": "tool", "content": "x"}])
    assert error_of(e)["param"] == "messages[0].tool_call_id"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert error_of(e)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_api_keys_are_checked_when_configured(make_frontend):
    fe = make_frontend(api_keys="key-one,key-two")
    with pytest.raises(openai.AuthenticationError) as e:
        fe.client(api_key="wrong").chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2)
    assert error_of(e)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        fe.client(api_key="wrong").models.list()
    assert httpx.get(fe.base_url + "/v1/models").status_code == 401
    r = fe.client(api_key="key-two").chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2)
    assert r.choices[0].message.content is not None
    assert httpx.get(fe.base_url + "/health").status_code == 200  # probes need no key


def test_body_too_large_is_413(make_frontend):
    fe = make_frontend(max_body_bytes=64 * 1024)
    big = [image_part(bytes(200 * 1024), "image/png")]
    with pytest.raises(openai.APIStatusError) as e:
        fe.client().chat.completions.create(model="minicpm_v_2_6", messages=[{"role": "user", "content": big}])
    assert e.value.status_code == 413 and error_of(e)["code"] == "request_too_large"
    # Chunked upload without Content-Length: the limit still holds.
    body = (b'{"model": "minicpm_v_2_6", "messages": [{"role": "user", "content": "' + b"a" * 100_000 + b'"}]}')
    r = httpx.post(fe.base_url + "/v1/chat/completions", content=iter([body[:50_000], body[50_000:]]),
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_too_many_requests_in_flight_is_429(make_frontend):
    fe = make_frontend(max_concurrent_requests=1)
    client = fe.client()
    stream = client.chat.completions.create(model="minicpm_v_2_6", messages=HI, stream=True, **LONG)
    next(iter(stream))  # the first request is running
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2)
    assert error_of(e)["type"] == "rate_limit_error"
    assert int(e.value.response.headers["retry-after"]) >= 1
    stream.close()
    deadline = time.monotonic() + 10
    while True:  # the slot frees once the cancelled stream is cleaned up
        try:
            assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("limit", [1, 3])
def test_the_limit_holds_for_a_burst_of_non_streaming_requests(make_frontend, limit):
    # 8 requests sent together: all pass the HTTP layer at once, before any of them reaches the model. Each is
    # long (hundreds of tokens), so none finishes while the others arrive: exactly `limit` are served.
    fe = make_frontend(max_concurrent_requests=limit)
    body = {"model": "minicpm_v_2_6", "messages": HI, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    barrier = threading.Barrier(8)

    def send(_):
        with httpx.Client(timeout=300) as http:
            barrier.wait()
            return http.post(fe.base_url + "/v1/chat/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * limit + [429] * (8 - limit), statuses
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 300
    assert metric(fe.base_url + "/metrics", "minicpmv_frontend_requests_in_flight", model="minicpm_v_2_6") == 0


def test_timeout_is_504_and_an_error_event_in_a_stream(make_frontend):
    fe = make_frontend(request_timeout=1.5)
    client = fe.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", messages=HI, **LONG)
    assert e.value.status_code == 504 and error_of(e)["type"] == "timeout_error"
    with pytest.raises(openai.APIError) as e:
        for _ in client.chat.completions.create(model="minicpm_v_2_6", messages=HI, stream=True, **LONG):
            pass
    assert "longer than the server's limit" in e.value.message


def test_triton_down_is_503_and_the_frontend_recovers(server, make_frontend):
    grpc = TCPProxy(int(server.grpc_url.rsplit(":", 1)[1]))
    http_ = TCPProxy(int(server.http_url.rsplit(":", 1)[1]))
    grpc.up(), http_.up()
    fe = make_frontend(grpc_url=f"127.0.0.1:{grpc.port}", http_url=f"127.0.0.1:{http_.port}",
                       models="minicpm_v_2_6")  # fmt: skip
    client = fe.client()
    assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices
    grpc.down(), http_.down()
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(fe.base_url + "/health/ready").status_code == 503
        assert httpx.get(fe.base_url + "/health").status_code == 200
    finally:
        grpc.up(), http_.up()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, "the frontend did not recover"
            time.sleep(0.2)
    assert httpx.get(fe.base_url + "/health/ready").status_code == 200
    grpc.down(), http_.down()


def test_client_disconnect_cancels_the_triton_request(frontend, server):
    running = lambda: metric(f"http://{server.metrics_url.removeprefix('http://')}", "minicpmv_running_sequences",  # noqa: E731
                             model="minicpm_v_2_6")  # fmt: skip
    body = {"model": "minicpm_v_2_6", "messages": HI, "stream": True, "max_tokens": 3000, "ignore_eos": True}
    with httpx.stream("POST", frontend.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(3):
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 5
        while running() < 1:  # the gauge is published every 50 ms
            assert time.monotonic() < deadline, "the request is not running"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while running() > 0:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.1)
    # Non-streaming too: the client gives up, the request stops.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(frontend.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    deadline = time.monotonic() + 10
    while running() > 0:
        assert time.monotonic() < deadline, "the non-streaming request kept running after the client left"
        time.sleep(0.1)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        data = page(300, 200)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_remote_images_only_from_allowed_hosts(make_frontend):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/page.png"
    try:
        allowed = make_frontend(allow_remote_images="true", remote_image_hosts="127.0.0.1").client()
        r = allowed.chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])  # fmt: skip
        assert r.usage.prompt_tokens > 64
        other = make_frontend(allow_remote_images="true", remote_image_hosts="example.com").client()
        with pytest.raises(openai.BadRequestError) as e:
            other.chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])  # fmt: skip
        assert error_of(e)["code"] == "host_not_allowed"
    finally:
        httpd.shutdown()


def test_openapi_describes_endpoints_and_errors(frontend):
    spec = httpx.get(frontend.base_url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/health", "/health/ready", "/metrics"):
        assert path in spec["paths"]
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


def test_server_keeps_serving_after_errors(client):
    assert client.chat.completions.create(model="minicpm_v_2_6", messages=HI, max_tokens=2).choices


