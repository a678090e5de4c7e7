"""The Responses API without Triton: a Responses request -> the chat request it stands for, errors named as
Responses params, and the response object of a finished chat completion (validated against OpenAI's schema)."""

from __future__ import annotations

import asyncio
import json

import pytest

from openai_frontend.backend import GenerateChunk
from openai_frontend.convert import to_generate_request
from openai_frontend.errors import APIError
from openai_frontend.responses import ResponsesRequest, build_response, restate, to_chat_request
from openai_frontend.schemas import ChatCompletion
from openai_frontend.settings import Settings
from tests.frontend.openapi_schemas import assert_valid
from tests.unit.fakes import MODEL, FakeBackend, app_client

PNG = "data:image/png;base64,iVBORw0KGgo="
PDF = "data:application/pdf;base64,JVBERi0xLjQK"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}  # fmt: skip


def chat_of(**body):
    request, origins = to_chat_request(ResponsesRequest.model_validate({"model": "m", **body}))
    return request.model_dump(exclude_none=True, by_alias=True), origins


def test_items_map_onto_chat_messages():
    chat, origins = chat_of(instructions="Be brief.", max_output_tokens=9, temperature=0.1, top_p=0.5, seed=3,
                            text={"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}},
                            tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, input=[
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "input_image", "image_url": PNG, "detail": "low"},
                                     {"type": "input_file", "filename": "a.pdf", "file_data": PDF},
                                     {"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "12 C"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
    ])  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief.\n\nUse metric units."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                                     {"type": "file", "file": {"file_data": PDF, "filename": "a.pdf"}},
                                     {"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
    ]  # fmt: skip
    assert origins == ["instructions", "input[1]", "input[2]", "input[4]", "input[5]"]
    assert chat["max_completion_tokens"] == 9 and chat["temperature"] == 0.1 and chat["top_p"] == 0.5
    assert chat["seed"] == 3 and chat["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert chat["tools"][0]["function"]["name"] == "get_weather"
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}


def test_a_string_input_is_one_user_message():
    chat, origins = chat_of(input="hello")
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and origins == ["input"]


@pytest.mark.parametrize("body, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]},
     "input[0].content[0].file_data"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools[0].parameters"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
])  # fmt: skip
def test_refusals_name_the_responses_param(body, param):
    with pytest.raises(APIError) as e:
        chat_of(**{"input": "hi", **body})
    assert e.value.status == 400 and e.value.param == param


def test_errors_of_the_chat_path_are_restated_with_responses_params():
    body = ResponsesRequest.model_validate({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]})  # fmt: skip
    request, origins = to_chat_request(body)
    with pytest.raises(APIError) as e:
        asyncio.run(to_generate_request(request, Settings()))
    assert e.value.param == "messages[0].content[1].image_url.url"
    restated = restate(e.value, origins)
    assert restated.param == "input[0].content[1].image_url" and restated.status == 400
    assert restate(APIError(400, "x", param="max_completion_tokens"), []).param == "max_output_tokens"


def test_a_finished_completion_becomes_a_valid_response_object():
    body = ResponsesRequest.model_validate({"model": "m", "input": "hi", "tools": [WEATHER], "max_output_tokens": 50})
    completion = ChatCompletion.model_validate({
        "id": "x", "model": "m", "system_fingerprint": "fp", "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                                                                         "total_tokens": 12},
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}}]})  # fmt: skip
    response = build_response(body, "resp_1", 1.0, completion)
    assert_valid(response, "Response")
    assert response["status"] == "completed" and response["tool_choice"] == "auto"
    assert response["output"] == [{"id": response["output"][0]["id"], "type": "function_call", "call_id": "call_a",
                                   "name": "get_weather", "arguments": '{"city":"Oslo"}', "status": "completed"}]
    assert response["usage"]["input_tokens"] == 7 and response["usage"]["total_tokens"] == 12
    completion.choices[0].finish_reason = "length"
    completion.choices[0].message.tool_calls = None
    completion.choices[0].message.content = "partial"
    cut = build_response(body, "resp_2", 1.0, completion)
    assert_valid(cut, "Response")
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["content"][0]["text"] == "partial" and cut["output"][0]["status"] == "incomplete"


# ---------------------------------------------------------------- POST /v1/responses with a fake backend


def sse_events(text: str) -> list[dict]:
    """The ``data`` of each SSE event, checked against its ``event:`` line and OpenAI's event schema."""
    events = []
    for block in filter(None, text.split("\n\n")):
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}" and event["sequence_number"] == len(events)
        assert_valid(event, "ResponseStreamEvent")
        events.append(event)
    return events


def answer(*texts: str, finish_reason: str) -> list[GenerateChunk]:
    """The backend's chunks of one answer: ``texts``, the last one with ``finish_reason``."""
    last = len(texts) - 1
    return [GenerateChunk(0, t, finish_reason if k == last else None, prompt_tokens=4, completion_tokens=k + 1)
            for k, t in enumerate(texts)]  # fmt: skip


CUT_CALL = answer('{"tool_calls": [{"name": "get_weather", ', '"arguments": {"city": "Os', finish_reason="length")
CASES = {  # request extras, the backend's answer, and the output items of the finished response
    "text": ({}, answer("Hel", "lo", finish_reason="length"), [("message", "Hello")]),
    "call": ({"tools": [WEATHER], "tool_choice": "required"}, CUT_CALL, [("function_call", '{"city":"Os')]),
}  # fmt: skip


def items(response: dict) -> list[tuple[str, str]]:
    return [(o["type"], o["content"][0]["text"] if o["type"] == "message" else o["arguments"])
            for o in response["output"]]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_stream_cut_off_by_max_output_tokens_ends_incomplete(case):
    extra, chunks, output = CASES[case]
    with app_client(FakeBackend(chunks)) as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2, "stream": True,
                                           **extra})  # fmt: skip
    assert r.status_code == 200
    events = sse_events(r.text)
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.incomplete" and "response.completed" not in types
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["completed_at"] is None and final["usage"]["output_tokens"] == 2
    assert items(final) == output and all(o["status"] == "incomplete" for o in final["output"])
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [d["status"] for d in done] == ["incomplete"] * len(output) and items({"output": done}) == output


@pytest.mark.parametrize("case", CASES)
def test_a_response_cut_off_by_max_output_tokens_is_incomplete(case):
    extra, chunks, output = CASES[case]
    with app_client(FakeBackend(chunks)) as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2, **extra})
    assert r.status_code == 200
    body = r.json()
    assert_valid(body, "Response")
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert items(body) == output and all(o["status"] == "incomplete" for o in body["output"])


def test_an_answer_that_ends_by_itself_completes_streaming_or_not():
    chunks = answer("Hel", "lo", finish_reason="stop")
    with app_client(FakeBackend(chunks)) as c:
        streamed = sse_events(c.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}).text)
        whole = c.post("/v1/responses", json={"model": MODEL, "input": "hi"}).json()
    assert streamed[-1]["type"] == "response.completed"
    assert "response.incomplete" not in [e["type"] for e in streamed]
    for response in (streamed[-1]["response"], whole):
        assert response["status"] == "completed" and response["incomplete_details"] is None
        assert response["completed_at"] and items(response) == [("message", "Hello")]
        assert response["output"][0]["status"] == "completed"
