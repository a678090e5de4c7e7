"""OpenAI's Responses API (``POST /v1/responses``) through the official ``openai`` SDK against the real stack
(tritonserver with tiny random-weight checkpoints). Response objects and every stream event are validated
against OpenAI's published schemas; answers are compared with the chat path's for the same conversation, which
shows the Responses request reaches the model as the same prompt (images and PDF pages included)."""

from __future__ import annotations

import base64
import json

import httpx
import jsonschema
import openai
import pytest

from tests.frontend.helpers import data_url, image_part, metric, page
from tests.frontend.openapi_schemas import assert_valid
from tests.frontend.test_documents import DPI, three_pages

pytestmark = pytest.mark.slow
MODEL = "minicpm_v_2_6"
FIXED = {"extra_body": {"ignore_eos": True}}  # fixed-length answers: the same tokens on both paths
QUESTION = "What is the invoice total?"
ANSWER_SCHEMA = {"type": "object", "properties": {"total": {"enum": ["12.50", "99.00"]}, "paid": {"type": "boolean"}},
                 "required": ["total", "paid"], "additionalProperties": False}  # fmt: skip
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Paris"]},
                                                           "celsius": {"type": "boolean"}},
                          "required": ["city", "celsius"], "additionalProperties": False}}  # fmt: skip


def pdf_url() -> str:
    return "data:application/pdf;base64," + base64.b64encode(three_pages()).decode()


def raw(client, **kwargs) -> dict:
    """A response as the JSON the server sent, validated against OpenAI's schema."""
    body = client.responses.with_raw_response.create(model=MODEL, **kwargs).http_response.json()
    assert_valid(body, "Response")
    return body


def raw_events(frontend, body: dict) -> list[dict]:
    """A streamed response's events, each validated against OpenAI's schema (named as its SSE event)."""
    with httpx.stream("POST", frontend.base_url + "/v1/responses", json={"model": MODEL, **body, "stream": True},
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    events = []
    for name, data in zip(lines[::2], lines[1::2], strict=True):
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        assert_valid(event, "ResponseStreamEvent")
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def chat_text(client, messages, **kwargs) -> tuple[str, int]:
    r = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
    return r.choices[0].message.content, r.usage.prompt_tokens


def test_text_input_gives_a_valid_response_object(client):
    body = raw(client, input=QUESTION, instructions="Answer briefly.", max_output_tokens=6, temperature=0,
               metadata={"job": "42"}, store=False, **FIXED)  # fmt: skip
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["model"] == MODEL
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["instructions"] == "Answer briefly." and body["metadata"] == {"job": "42"}
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")
    text, prompt_tokens = chat_text(client, [{"role": "system", "content": "Answer briefly."},
                                             {"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
                                    **FIXED)  # fmt: skip
    assert item["content"][0]["text"] == text  # the same prompt and sampling as the chat path
    usage = body["usage"]
    assert usage["input_tokens"] == prompt_tokens and usage["output_tokens"] == 6
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    sdk = client.responses.create(model=MODEL, input=QUESTION, instructions="Answer briefly.", max_output_tokens=6,
                                  temperature=0, **FIXED)  # fmt: skip
    assert sdk.output_text == text


def test_image_and_pdf_inputs_reach_the_model_as_on_the_chat_path(make_frontend):
    client = make_frontend(pdf_dpi=DPI).client()
    png = page()
    pdf = pdf_url()
    response_parts = [{"type": "input_image", "image_url": data_url(png), "detail": "auto"},
                      {"type": "input_file", "filename": "report.pdf", "file_data": pdf},
                      {"type": "input_text", "text": QUESTION}]  # fmt: skip
    chat_parts = [image_part(png), {"type": "file", "file": {"filename": "report.pdf", "file_data": pdf}},
                  {"type": "text", "text": QUESTION}]  # fmt: skip
    body = raw(client, input=[{"role": "user", "content": response_parts}], max_output_tokens=5, temperature=0,
               **FIXED)  # fmt: skip
    text, prompt_tokens = chat_text(client, [{"role": "user", "content": chat_parts}], max_tokens=5, temperature=0,
                                    **FIXED)  # fmt: skip
    assert body["usage"]["input_tokens"] == prompt_tokens > 4 * 64  # one image and three PDF pages
    assert body["output"][0]["content"][0]["text"] == text


def test_stream_with_an_image_and_a_pdf_through_the_sdk(make_frontend):
    client = make_frontend(pdf_dpi=DPI).client()
    fmt = {"format": {"type": "json_schema", "name": "invoice", "schema": ANSWER_SCHEMA, "strict": True}}
    for part in ({"type": "input_image", "image_url": data_url(page()), "detail": "low"},
                 {"type": "input_file", "filename": "report.pdf", "file_data": pdf_url()}):  # fmt: skip
        request = {"model": MODEL, "input": [{"role": "user", "content": [part, {"type": "input_text", "text":
                                                                                  "Total and paid, as JSON."}]}],
                   "text": fmt, "max_output_tokens": 200, "temperature": 0}  # fmt: skip
        whole = client.responses.create(**request)
        with client.responses.stream(**request) as stream:
            events = list(stream)
            final = stream.get_final_response()
        types = [e.type for e in events]
        assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]  # fmt: skip
        assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                              "response.completed"]  # fmt: skip
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) > 1 and "".join(deltas) == final.output_text == whole.output_text
        assert final.status == whole.status == "completed"  # the grammar completed the JSON
        data = json.loads(final.output_text)
        jsonschema.validate(data, ANSWER_SCHEMA)
        assert final.usage.input_tokens == whole.usage.input_tokens > 64
        assert final.usage.output_tokens == whole.usage.output_tokens


def test_raw_stream_events_follow_openais_schemas(frontend, client):
    events = raw_events(frontend, {"input": QUESTION, "max_output_tokens": 5, "temperature": 0, "ignore_eos": True})
    types = [e["type"] for e in events]
    assert types[0] == "response.created" and types[-1] == "response.incomplete"  # cut off by max_output_tokens
    final = events[-1]["response"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final["output"][0]["content"][0]["text"]
    assert final["status"] == "incomplete" and final["usage"]["output_tokens"] == 5
    assert {e["response"]["id"] for e in events if "response" in e} == {final["id"]}
    whole = raw(client, input=QUESTION, max_output_tokens=5, temperature=0, **FIXED)
    assert final["output"][0]["content"] == whole["output"][0]["content"]


def check_calls(output: list[dict]) -> int:
    """Function-call items of a completed response follow the function's schema; returns how many."""
    for item in output:
        assert item["type"] == "function_call" and item["name"] == "get_weather"
        assert item["call_id"].startswith("call_") and item["id"].startswith("fc_")
        jsonschema.validate(json.loads(item["arguments"]), WEATHER["parameters"])
    return len(output)


def test_function_calls_follow_the_schema_streaming_or_not(client, frontend):
    # One call (parallel_tool_calls false) of a function whose arguments are an enum and a boolean: the grammar
    # bounds the answer (at most 84 characters and 24 gaps of at most 16 whitespace characters, i.e. 468 tokens
    # and the end token), so with this much room every answer completes, whatever the random weights do.
    asked = {"input": "Weather in Oslo?", "tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 480,
             "temperature": 1.0, "parallel_tool_calls": False}  # fmt: skip
    for seed in range(4):
        body = raw(client, **asked, extra_body={"seed": seed})
        assert body["tools"][0]["name"] == "get_weather" and body["tool_choice"] == "required"
        assert body["status"] == "completed" and body["incomplete_details"] is None, body
        assert len(body["output"]) == 1 and check_calls(body["output"]) == 1

    events = raw_events(frontend, {**asked, "temperature": 0})
    whole = raw(client, **asked | {"temperature": 0})
    final = events[-1]["response"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert [o["arguments"] for o in final["output"]] == [o["arguments"] for o in whole["output"]] == [deltas]
    assert final["status"] == whole["status"] == "completed" and events[-1]["type"] == "response.completed"
    assert check_calls(final["output"]) == 1
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == deltas and done["name"] == "get_weather"


def test_function_call_outputs_in_the_input_reach_the_prompt(client):
    def turn(output: str):
        return client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=3, temperature=0, input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Oslo", "celsius": true}'},
            {"type": "function_call_output", "call_id": "call_1", "output": output}])  # fmt: skip

    short, long = turn("12"), turn("12 degrees, light rain from the west, clearing up in the evening")
    assert long.usage.input_tokens > short.usage.input_tokens


@pytest.mark.parametrize("extra, param, status", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", 400),
    ({"store": True}, "store", 400),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1", "detail": "auto"}]}]},
     "input[0].content[0].image_url", 400),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,"
                                              + base64.b64encode(b"%PDF-1.4 junk").decode()}]}]},
     "input[0].content[0].file_data", 400),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                                              "detail": "auto"}]}]}, "input[0].content[0].image_url", 400),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", 400),
    ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}]},
     "tools[0].parameters", 400),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", 400),
    ({"model": "gpt-4o"}, None, 404),
])  # fmt: skip
def test_bad_requests_get_openai_errors_naming_the_param(client, frontend, extra, param, status):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **extra}
    for stream in (False, True):
        r = httpx.post(frontend.base_url + "/v1/responses", json={**body, "stream": stream}, timeout=60)
        error = r.json()["error"]
        assert r.status_code == status and set(error) == {"message", "type", "param", "code"}
        assert status == 404 or error["param"] == param, error
    assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).status  # still serving


def test_api_keys_and_metrics_apply(make_frontend):
    fe = make_frontend(api_keys="key-one")
    with pytest.raises(openai.AuthenticationError):
        fe.client(api_key="wrong").responses.create(model=MODEL, input="hi", max_output_tokens=2)
    url = fe.base_url + "/metrics"
    before = metric(url, "minicpmv_frontend_requests_total", model=MODEL, status="200")
    tokens = metric(url, "minicpmv_frontend_completion_tokens_total", model=MODEL)
    fe.client(api_key="key-one").responses.create(model=MODEL, input="hi", max_output_tokens=3, **FIXED)
    with fe.client(api_key="key-one").responses.stream(model=MODEL, input="hi", max_output_tokens=3,
                                                       **FIXED) as stream:  # fmt: skip
        assert [e.type for e in stream][-1] == "response.incomplete"
    assert metric(url, "minicpmv_frontend_requests_total", model=MODEL, status="200") == before + 2
    assert metric(url, "minicpmv_frontend_completion_tokens_total", model=MODEL) == tokens + 6
