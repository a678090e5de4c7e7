"""Both models of model_repository/ served by a real tritonserver (CPU configs, tiny checkpoints)."""

from __future__ import annotations

import base64
import io
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw
from tritonclient.utils import InferenceServerException

from tests.triton.conftest import MODELS

pytestmark = pytest.mark.slow


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    array = np.array(value, dtype=np.object_ if dtype == "BYTES" else None)
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def build_inputs(*, text=None, messages=None, images=(), stream=False, sampling=None, extra=()):
    inputs = []
    if text is not None:
        inputs.append(tensor("text_input", [[text.encode()]], "BYTES"))
    if messages is not None:
        inputs.append(tensor("messages", [[json.dumps(messages).encode()]], "BYTES"))
    if images:
        inputs.append(tensor("image", [list(images)], "BYTES"))
    inputs.append(tensor("stream", [[stream]], "BOOL"))
    if sampling is not None:
        raw = sampling if isinstance(sampling, str) else json.dumps(sampling)
        inputs.append(tensor("sampling_parameters", [[raw.encode()]], "BYTES"))
    for name in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", *extra):
        inputs.append(tensor(name, [[True]], "BOOL"))
    return inputs


def run_stream(client, model, inputs, timeout=120.0):
    """Send one request on a gRPC stream; return its responses (as tritonclient results) or raise its error."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        responses = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses
    finally:
        client.stop_stream()


def text_of(responses) -> str:
    return "".join(r.as_numpy("text_output")[0][0].decode() for r in responses if r.as_numpy("text_output") is not None)


def page_png() -> bytes:
    image = Image.new("RGB", (900, 640), "white")
    draw = ImageDraw.Draw(image)
    for i in range(14):
        draw.text((30, 30 + 40 * i), f"Item {i}    qty {i + 2}    price {9.5 * i:.2f}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model", MODELS)
def test_models_are_ready_and_answer_text_and_image_requests(client, model):
    assert client.is_model_ready(model)
    text = run_stream(client, model, build_inputs(
        messages=[{"role": "user", "content": "What is the invoice total?"}],
        sampling={"max_tokens": 8, "temperature": 0, "ignore_eos": True}))  # fmt: skip
    assert len(text) == 1
    final = text[0]
    assert final.as_numpy("finish_reason")[0][0] == b"length"
    assert final.as_numpy("num_output_tokens")[0][0] == 8
    assert "What is the invoice total?" in text_of(text)  # non-streaming includes the input by default
    image = run_stream(client, model, build_inputs(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Total?"}]}],
        images=[page_png()], sampling={"max_tokens": 6, "temperature": 0, "ignore_eos": True},
        extra=("exclude_input_in_output",)))  # fmt: skip
    assert image[-1].as_numpy("num_output_tokens")[0][0] == 6
    assert image[-1].as_numpy("num_input_tokens")[0][0] > 64  # the image placeholders count as input
    assert text_of(image) and "Total?" not in text_of(image)


@pytest.mark.parametrize("model", MODELS)
def test_streaming_sends_several_responses_then_the_final_flag(client, model):
    responses = run_stream(client, model, build_inputs(
        text="<|im_start|>user\nList the items.<|im_end|>\n<|im_start|>assistant\n", stream=True,
        sampling={"max_tokens": 12, "temperature": 0, "ignore_eos": True}))  # fmt: skip
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert len(responses) >= 3 and finals[-1] and not any(finals[:-1])
    assert responses[-1].as_numpy("num_output_tokens")[0][0] == 12
    whole = run_stream(client, model, build_inputs(
        text="<|im_start|>user\nList the items.<|im_end|>\n<|im_start|>assistant\n",
        sampling={"max_tokens": 12, "temperature": 0, "ignore_eos": True}, extra=("exclude_input_in_output",)))  # fmt: skip
    assert text_of(responses) == text_of(whole)


def generate(server, model: str, body: dict) -> tuple[int, dict]:
    """Triton's HTTP generate endpoint: (status, JSON body)."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/generate",
                                     data=json.dumps(body).encode(), method="POST")  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BROKEN_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n-broken").decode()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text_input": "(<image>./</image>)\nQ", "image": [BROKEN_PNG]}, "not a decodable image"),
        ({"text_input": "hello", "sampling_parameters": "{not json"}, "not valid JSON"),
        ({"stream": False}, "either 'text_input' or 'messages' is required"),
        ({"messages": json.dumps([{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                                  {"role": "user", "content": "c"}])}, "at most one system message"),
        ({"text_input": "hello", "sampling_parameters": json.dumps({"temperature": -2})}, "temperature"),
        ({"text_input": "hello", "sampling_parameters": json.dumps({"max_tokens": 10**6})}, "context"),
        ({"text_input": "hello", "sampling_parameters": json.dumps({"beam_width": 3})}, "unknown sampling"),
    ],
)  # fmt: skip
def test_bad_input_gets_invalid_arg_and_the_model_keeps_serving(server, body, message):
    status, answer = generate(server, "minicpm_v_2_6", body)
    assert status == 400, answer  # Triton maps INVALID_ARG to 400
    assert re.search(message, answer["error"]), answer
    status, answer = generate(server, "minicpm_v_2_6", {"text_input": "hi", "sampling_parameters": '{"max_tokens": 2}'})
    assert status == 200 and "text_output" in answer


def test_bad_input_on_a_grpc_stream_gets_an_error_response(client):
    with pytest.raises(InferenceServerException, match="not a decodable image"):
        run_stream(client, "minicpm_v_2_6", build_inputs(text="(<image>./</image>)\nQ", images=[b"\x89PNG\r\n-broken"]))
    ok = run_stream(client, "minicpm_v_2_6", build_inputs(text="hi", sampling={"max_tokens": 2}))
    assert ok[-1].as_numpy("num_output_tokens")[0][0] >= 1


def model_stats(client, model):
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def metric(server, name: str, model: str) -> float:
    body = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    match = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', body, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def test_concurrent_requests_are_batched_by_triton_and_by_the_engine(server):
    model = "minicpm_v_2_6_int4"
    probe = grpcclient.InferenceServerClient(server.grpc_url)
    inferences0, executions0 = model_stats(probe, model)
    tokens0 = metric(server, "minicpmv_generated_tokens_total", model)
    steps0 = metric(server, "minicpmv_decode_steps_total", model)
    errors = []

    def one(i):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            run_stream(c, model, build_inputs(text=f"<|im_start|>user\nQuestion {i}<|im_end|>\n", stream=True,
                                              sampling={"max_tokens": 30, "temperature": 0, "ignore_eos": True}))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    inferences, executions = model_stats(probe, model)
    probe.close()
    assert inferences - inferences0 == 8
    assert executions - executions0 < 8  # Triton's dynamic batcher handed several requests to one execute()
    deadline = time.monotonic() + 10  # the counters are published every 50 ms
    while metric(server, "minicpmv_generated_tokens_total", model) - tokens0 < 8 * 30:
        assert time.monotonic() < deadline, "the generated tokens were not all published"
        time.sleep(0.05)
    tokens = metric(server, "minicpmv_generated_tokens_total", model) - tokens0
    steps = metric(server, "minicpmv_decode_steps_total", model) - steps0
    assert tokens == 8 * 30
    assert tokens / steps > 1.5  # the engine decoded several sequences per step


def test_cancelled_streaming_request_stops_generating(server):
    model = "minicpm_v_2_6"
    c = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer(model, build_inputs(text="<|im_start|>user\nGo on.<|im_end|>\n", stream=True,
                                             sampling={"max_tokens": 3000, "temperature": 0, "ignore_eos": True}))  # fmt: skip
    for _ in range(3):
        result, error = results.get(timeout=60)
        assert error is None
    tokens_before = metric(server, "minicpmv_generated_tokens_total", model)
    c.stop_stream(cancel_requests=True)
    c.close()
    deadline = time.monotonic() + 10
    while metric(server, "minicpmv_running_sequences", model) > 0:
        assert time.monotonic() < deadline, "the cancelled request is still running"
        time.sleep(0.1)
    # The engine's promise: the cancellation reaches it within Triton's 50 ms poll, the step in flight then
    # completes, and nothing more is generated; a published snapshot without the sequence holds all its tokens
    # (Engine.stats reads the running set first), so the count read now is final.
    generated = metric(server, "minicpmv_generated_tokens_total", model) - tokens_before
    time.sleep(0.5)  # several publishes (every 50 ms) and, were it still decoding, dozens of steps
    assert metric(server, "minicpmv_generated_tokens_total", model) - tokens_before == generated
    assert generated < 500


def test_metrics_show_kv_usage_and_prefix_cache_hits_of_a_repeated_page(server, client):
    """The same page asked about twice: the second prompt's leading blocks come from the prefix cache, and the
    engine's KV gauges are published (the metrics are read from Triton's metrics port)."""
    model = "minicpm_v_2_6"
    assert metric(server, "minicpmv_kv_cache_blocks", model) > 0
    hits0 = metric(server, "minicpmv_prefix_cache_hits_total", model)
    queries0 = metric(server, "minicpmv_prefix_cache_queries_total", model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which totals differ?"}]}]
    for _ in range(2):
        responses = run_stream(client, model, build_inputs(messages=messages, images=[page_png()],
                                                          sampling={"max_tokens": 2, "temperature": 0}))
        assert text_of(responses) is not None

    def hits_published() -> bool:
        return metric(server, "minicpmv_prefix_cache_hits_total", model) - hits0 >= 64  # a page's worth at least

    deadline = time.monotonic() + 10
    while not hits_published() and time.monotonic() < deadline:  # published by the model every 50 ms
        time.sleep(0.05)
    assert hits_published()
    assert metric(server, "minicpmv_prefix_cache_queries_total", model) - queries0 >= 2 * 64
    assert 0.0 <= metric(server, "minicpmv_kv_cache_usage_ratio", model) <= 1.0
