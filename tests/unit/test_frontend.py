"""The frontend's pieces without Triton: request conversion, images, error mapping, SSE, settings.
A fake backend stands in for Triton here; tests/frontend/ runs the real one."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from minicpmv.engine.errors import ContextLengthError, InvalidRequestError, QueueFullError, wire_message
from openai_frontend import images
from openai_frontend.backend import BackendError, GenerateChunk
from openai_frontend.convert import to_generate_request
from openai_frontend.errors import APIError
from openai_frontend.schemas import ChatCompletionRequest
from openai_frontend.settings import Settings
from openai_frontend.triton_client import classify
from tests.unit.fakes import Call, FakeBackend, app_client, make_app, run_with_app, sample, until


def png(width=64, height=48, mode="RGB", fmt="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), "white").save(buffer, fmt, **save)
    return buffer.getvalue()


def url(data: bytes, mime="image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def convert(body: dict, **settings):
    request = ChatCompletionRequest.model_validate({"model": "m", **body})
    return asyncio.run(to_generate_request(request, Settings(**settings)))


# ---------------------------------------------------------------- conversion


def test_openai_fields_map_to_engine_sampling_names():
    g = convert({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 7,
                 "stop": "END", "temperature": 0.2, "top_p": 0.9, "seed": 3, "presence_penalty": 0.5,
                 "frequency_penalty": 0.1, "logprobs": True, "top_logprobs": 2, "top_k": 5, "min_tokens": 2,
                 "repetition_penalty": 1.1, "ignore_eos": True, "max_slice_nums": 4,
                 "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})  # fmt: skip
    assert g.sampling == {"max_tokens": 7, "stop": ["END"], "temperature": 0.2, "top_p": 0.9, "seed": 3,
                          "presence_penalty": 0.5, "frequency_penalty": 0.1, "logprobs": True, "top_logprobs": 2,
                          "top_k": 5, "min_tokens": 2, "repetition_penalty": 1.1, "ignore_eos": True,
                          "max_slice_nums": 4,
                          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}  # fmt: skip
    assert g.logprobs and not g.stream and g.request_id.startswith("chatcmpl-")


def test_fields_left_out_keep_the_model_defaults():
    assert convert({"messages": [{"role": "user", "content": "hi"}]}).sampling == {}


def test_messages_become_placeholders_with_images_in_order():
    a, b = png(30, 20), png(20, 30)
    g = convert({"messages": [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(a)}}, {"type": "text", "text": "q"},
                                     {"type": "image_url", "image_url": {"url": url(b)}}]},
        {"role": "assistant", "content": None},
    ]})  # fmt: skip
    assert g.messages == [{"role": "system", "content": "sys"},
                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}, {"type": "image"}]},
                          {"role": "assistant", "content": ""}]  # fmt: skip
    assert g.images == [a, b]  # small images pass through byte for byte


def test_detail_is_read_per_image():
    """low: the whole image only (1 slice); high: the server's high_detail_max_slice_nums; auto: nothing (the
    request's max_slice_nums or the model's default); an image's max_slice_nums overrides its detail."""
    def image(**extra):
        return {"type": "image_url", "image_url": {"url": url(png()), **extra}}

    g = convert({"messages": [{"role": "user", "content": [
        image(detail="low"), image(detail="high"), image(), image(detail="low", max_slice_nums=4)]}],
        "max_slice_nums": 6})  # fmt: skip
    assert g.messages[0]["content"] == [{"type": "image", "max_slice_nums": 1}, {"type": "image", "max_slice_nums": 9},
                                        {"type": "image"}, {"type": "image", "max_slice_nums": 4}]  # fmt: skip
    assert g.sampling == {"max_slice_nums": 6}  # the request's value: for the images that give none


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}, {"role": "system", "content": "c"}]},
         "messages[2]", "only one system message"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "at least one user message"),
        ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
                       {"role": "user", "content": "q"}]}, "messages[0].content[0]", "only allowed in user messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "content is required"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "not supported"),
        ({"messages": [{"role": "user", "content": "q"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"messages": [{"role": "user", "content": "q"}], "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"messages": [{"role": "user", "content": "q"}], "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]}, "tools[0].function", "name"),
        ({"messages": [{"role": "user", "content": "q"}], "functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:text/plain;base64,AA=="}}]}]},
         "messages[0].content[0].file.file_data", "only PDF files"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
         "messages[0].content[0].file", "file ids are not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQK"}}]}]},
         "messages[0].content[0].file.file_data", "PDF"),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_parameter(body, param, message):
    with pytest.raises(APIError) as e:
        convert(body)
    assert e.value.status == 400 and e.value.param == param and message in e.value.message


def three_page_pdf() -> bytes:
    pages = [Image.new("RGB", (200 + 10 * i, 300), color) for i, color in enumerate(("red", "green", "blue"))]
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buffer.getvalue()


def test_pdf_pages_become_images_in_order():
    pdf_url = url(three_page_pdf(), "application/pdf")
    g = convert({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarise"}, {"type": "file", "file": {"file_data": pdf_url, "filename": "r.pdf"}},
        {"type": "image_url", "image_url": {"url": url(png())}}]}]}, pdf_dpi=72)  # fmt: skip
    assert g.messages[0]["content"] == [{"type": "text", "text": "Summarise"}] + [{"type": "image"}] * 4
    colours = [Image.open(io.BytesIO(page)).convert("RGB").getpixel((50, 50)) for page in g.images[:3]]
    assert [max(range(3), key=lambda c: rgb[c]) for rgb in colours] == [0, 1, 2]  # red, green, blue pages
    assert [Image.open(io.BytesIO(page)).width for page in g.images[:3]] == [200, 210, 220]
    ranged = convert({"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": pdf_url, "pages": "2-3"}}]}]}, pdf_dpi=72)  # fmt: skip
    assert len(ranged.images) == 2 and Image.open(io.BytesIO(ranged.images[0])).width == 210
    with pytest.raises(APIError, match="at most 2 per request"):
        convert({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": pdf_url}}]}]},
                max_images_per_request=2)  # fmt: skip
    with pytest.raises(APIError) as e:
        convert({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": pdf_url, "pages": "5"}}]}]})
    assert e.value.code == "invalid_pdf"


def test_image_limits_per_request():
    part = {"type": "image_url", "image_url": {"url": url(png())}}
    with pytest.raises(APIError, match="at most 2 per request"):
        convert({"messages": [{"role": "user", "content": [part] * 3}]}, max_images_per_request=2)


# ---------------------------------------------------------------- images


def test_large_images_are_downscaled_to_the_pixel_budget():
    settings = Settings(image_pixel_budget=100_000)
    out = Image.open(io.BytesIO(images.prepare_image(png(1000, 500), settings, "p")))
    assert out.width * out.height <= 100_000 and abs(out.width / out.height - 2) < 0.02
    assert out.format == "PNG"
    jpeg = Image.open(io.BytesIO(images.prepare_image(png(1000, 500, fmt="JPEG"), settings, "p")))
    assert jpeg.format == "JPEG" and jpeg.width * jpeg.height <= 100_000


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (60, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    out = Image.open(io.BytesIO(images.prepare_image(buffer.getvalue(), Settings(), "p")))
    assert out.size == (20, 60)


@pytest.mark.parametrize(
    "data, code",
    [
        (b"GIF89a-not-really", "invalid_image"),
        (png(fmt="ICO"), "invalid_image"),  # decodable, but not a format we accept
        (png(100, 100), "image_too_large"),  # over max_image_pixels below
    ],
)
def test_bad_or_oversized_images_are_refused(data, code):
    with pytest.raises(APIError) as e:
        images.prepare_image(data, Settings(max_image_pixels=5000), "p")
    assert e.value.status == 400 and e.value.code == code


def test_decompression_bombs_are_refused_before_decoding():
    # A PNG header claiming 100000 x 100000 pixels: refused from the header alone.
    bomb = bytearray(png(1, 1))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # keep the header chunk's CRC valid
    with pytest.raises(APIError) as e:
        images.prepare_image(bytes(bomb), Settings(), "p")
    assert e.value.code == "image_too_large"


def test_data_urls_must_be_base64_and_within_the_byte_limit():
    with pytest.raises(APIError, match="base64 data URL"):
        images.parse_data_url("data:image/png,rawtext", max_bytes=100, param="p")
    with pytest.raises(APIError, match="larger than the limit"):
        images.parse_data_url(url(bytes(1000)), max_bytes=100, param="p")
    assert images.parse_data_url("data:image/png;base64,AAEC\nAw==", max_bytes=100, param="p").data == b"\0\1\2\3"


# ---------------------------------------------------------------- Triton error messages


@pytest.mark.parametrize(
    "message, kind, code",
    [
        ("Exceeds maximum queue size", BackendError.QUEUE_FULL, "queue_full"),
        (QueueFullError("300 requests are already waiting; retry later").wire(), BackendError.QUEUE_FULL, "queue_full"),
        (wire_message("internal_error", "internal error: RuntimeError"), BackendError.INTERNAL, None),
        (ContextLengthError("long", prompt_tokens=40, max_tokens=99999, limit=32768).wire(), BackendError.INVALID,
         "context_length_exceeded"),
        ("Request for unknown model: 'x' is not found", BackendError.UNAVAILABLE, None),
        (wire_message("cancelled", "request cancelled"), BackendError.CANCELLED, None),
        (InvalidRequestError("image 0: not a decodable image").wire(), BackendError.INVALID, None),
    ],
)  # fmt: skip
def test_triton_messages_are_classified(message, kind, code):
    error = classify(message)
    assert error.kind == kind and error.code == code


# ---------------------------------------------------------------- the app with a fake backend


BODY = {"model": "MiniCPM-V-2_6", "messages": [{"role": "user", "content": "hi"}]}
CHUNKS = [GenerateChunk(0, "Hel", prompt_tokens=5, completion_tokens=1),
          GenerateChunk(0, "lo", "stop", prompt_tokens=5, completion_tokens=2)]  # fmt: skip


def test_completion_joins_chunks_and_counts_usage():
    backend = FakeBackend(CHUNKS)
    with app_client(backend) as c:
        r = c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "MiniCPM-V-2_6" and backend.requests[0][0] == "minicpm_v_2_6"  # alias resolved
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_sse_stream_format():
    with app_client(FakeBackend(CHUNKS)) as c:
        r = c.post("/v1/chat/completions", json={**BODY, "stream": True, "stream_options": {"include_usage": True}})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hel", "lo"]
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 7
    assert all(c["usage"] is None for c in chunks[:4])


@pytest.mark.parametrize(
    "error, status, type_",
    [
        (BackendError(BackendError.QUEUE_FULL, "full", "queue_full"), 429, "rate_limit_error"),
        (BackendError(BackendError.UNAVAILABLE, "down"), 503, "service_unavailable_error"),
        (BackendError(BackendError.INVALID, "bad"), 400, "invalid_request_error"),
        (BackendError(BackendError.INTERNAL, "failed"), 500, "internal_error"),
        (RuntimeError("secret detail"), 500, "internal_error"),
    ],
)
def test_backend_errors_map_to_statuses_without_details_leaking(error, status, type_):
    with app_client(FakeBackend(error=error)) as c:
        r = c.post("/v1/chat/completions", json=BODY)
        streamed = c.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert r.status_code == status and r.json()["error"]["type"] == type_
    assert "secret" not in r.text and "Traceback" not in r.text
    assert streamed.status_code == status  # failed before the first token: an HTTP error, not an event


def test_error_after_the_first_token_is_an_event_and_the_stream_ends():
    backend = FakeBackend(CHUNKS[:1], error=BackendError(BackendError.INTERNAL, "boom"))
    with app_client(backend) as c:
        r = c.post("/v1/chat/completions", json={**BODY, "stream": True})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert json.loads(events[-2])["error"]["type"] == "internal_error" and events[-1] == "[DONE]"
    assert backend.closed == 1


def test_deadline_gives_504_and_closes_the_backend_stream():
    backend = FakeBackend(CHUNKS, delay=1.0)
    with app_client(backend, request_timeout=0.2) as c:
        r = c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert backend.closed == 1


def test_validation_errors_are_400_in_the_envelope():
    with app_client(FakeBackend(CHUNKS)) as c:
        bad_json = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        missing = c.post("/v1/chat/completions", json={"model": "m"})
        wrong_path = c.get("/v2/nothing")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert wrong_path.status_code == 404 and set(wrong_path.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- in-flight accounting

NAME = "MiniCPM-V-2_6"  # the name the requests use: the metrics' label
LIMIT = 2  # max_concurrent_requests of these tests
STREAM = {**BODY, "stream": True}
RESPONSE = {"model": NAME, "input": "hi"}
FAILED = {"chunks": [], "error": BackendError(BackendError.INTERNAL, "boom")}
HELD = {"chunks": CHUNKS, "hold_at": 1}  # the first chunk, then the backend waits (until the client goes away)


def in_flight(app) -> tuple[int, float]:
    """The chat service's in-flight count (the limit's slots) and the in-flight gauge: both exact."""
    return app.state.chat.in_flight, sample(app, "minicpmv_frontend_requests_in_flight", model=NAME)


async def admits_exactly(app, backend: FakeBackend, n: int) -> None:
    """``n`` requests held at the backend fill the limit: one more gets 429, and none is admitted past it."""
    backend.chunks, backend.error, backend.hold_at, backend.release = CHUNKS, None, 0, asyncio.Event()
    calls = [Call(app, "/v1/chat/completions", BODY) for _ in range(n + 1)]
    tasks = [asyncio.create_task(c.run()) for c in calls]
    await until(lambda: backend.waiting + sum(t.done() for t in tasks) == n + 1, "every request admitted or refused")
    await asyncio.sleep(0.02)  # time for a request admitted past the limit to show up at the backend
    refused = [c.status for c, t in zip(calls, tasks, strict=True) if t.done()]
    assert refused == [429], "exactly one request over the limit"
    assert backend.waiting == n and in_flight(app) == (n, n)
    backend.release.set()
    await asyncio.gather(*tasks)
    assert sorted(c.status for c in calls) == [200] * n + [429]
    assert in_flight(app) == (0, 0)


@pytest.mark.parametrize(
    "path, body, behaviour, client_leaves, status, counted",
    [
        ("/v1/chat/completions", BODY, FAILED, False, 500, "500"),
        ("/v1/chat/completions", STREAM, FAILED, False, 500, "500"),  # before the first token: an HTTP error
        ("/v1/chat/completions", STREAM, {**FAILED, "chunks": CHUNKS[:1]}, False, 200, "500"),  # an error event
        ("/v1/chat/completions", BODY, HELD, True, 499, "499"),
        ("/v1/chat/completions", STREAM, HELD, True, 200, "499"),  # gone mid-stream
        ("/v1/responses", RESPONSE, FAILED, False, 500, "500"),
        ("/v1/responses", RESPONSE, HELD, True, 499, "499"),
        ("/v1/responses", {**RESPONSE, "stream": True}, HELD, True, 200, "499"),
    ],
    ids=["error", "stream-error-first", "stream-error-later", "gone", "stream-gone", "responses-error",
         "responses-gone", "responses-stream-gone"],
)  # fmt: skip
def test_in_flight_count_returns_to_exactly_zero_and_the_limit_still_holds(path, body, behaviour, client_leaves,
                                                                          status, counted):  # fmt: skip
    backend = FakeBackend(**behaviour)

    async def scenario(app):
        call = Call(app, path, body)
        task = asyncio.create_task(call.run())
        if client_leaves:
            await until(lambda: backend.waiting == 1 and (not body.get("stream") or call.body_chunks >= 2))
            assert in_flight(app) == (1, 1)
            call.disconnect()
        await task
        assert call.status == status
        if client_leaves:
            assert b"[DONE]" not in call.body and b"response.completed" not in call.body
        assert in_flight(app) == (0, 0)  # not 1 (a slot leaked), not -1 (released twice)
        assert backend.closed == 1  # the backend's stream was closed too (the request cancelled at Triton)
        assert sample(app, "minicpmv_frontend_requests_total", model=NAME, status=counted) == 1
        await admits_exactly(app, backend, LIMIT)
        await admits_exactly(app, backend, LIMIT)  # and again: nothing drifts

    run_with_app(make_app(backend, max_concurrent_requests=LIMIT), scenario)


# ---------------------------------------------------------------- settings


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINICPMV_FRONTEND_API_KEYS", "a, b")
    monkeypatch.setenv("MINICPMV_FRONTEND_MODELS", "minicpm_v_2_6_int4")
    monkeypatch.setenv("MINICPMV_FRONTEND_PORT", "9100")
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.models == ["minicpm_v_2_6_int4"] and s.port == 9100


def test_bad_settings_fail_at_start_with_a_message():
    r = subprocess.run([sys.executable, "-m", "openai_frontend", "--port", "0"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and "port" in r.stderr
    help_ = subprocess.run([sys.executable, "-m", "openai_frontend", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "MINICPMV_FRONTEND_" in help_.stdout


def test_frontend_imports_no_torch():
    code = "import sys, openai_frontend.app, openai_frontend.triton_client; print('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip() == "False"
