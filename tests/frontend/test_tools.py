"""Function calling through the official ``openai`` SDK and LangChain against the real stack (tritonserver with
tiny random-weight checkpoints). The weights are random, so argument *values* are noise; what must hold is
the contract: whenever ``finish_reason`` is ``tool_calls``, every call names a given function and its
``arguments`` parse and validate against that function's schema. Responses and stream chunks are checked
against OpenAI's published schemas."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.frontend.helpers import image_part, page
from tests.frontend.openapi_schemas import assert_valid

pytestmark = pytest.mark.slow
MODEL = "minicpm_v_2_6"


class Lookup(BaseModel):
    """Look up the weather for a city."""

    city: Literal["Oslo", "Bergen", "Paris"]
    unit: Literal["C", "F"]
    detailed: bool


TOTAL = {"type": "function", "function": {"name": "record_total", "description": "Record an invoice total.",
                                          "parameters": {"type": "object", "properties": {
                                              "currency": {"enum": ["EUR", "USD"]}, "paid": {"type": "boolean"}},
                                              "required": ["currency", "paid"], "additionalProperties": False}}}  # fmt: skip
LOOKUP = openai.pydantic_function_tool(Lookup)
TOOLS = [LOOKUP, TOTAL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Oslo? Also record the invoice total."}]
# Random weights spend many tokens on the whitespace the grammar allows between JSON tokens (up to 16 characters
# per gap), so complete calls need room; with these seeds a fair share of the choices complete.
ROOM = 240


def check_call(call: dict, allowed=SCHEMAS) -> dict:
    """One tool call in OpenAI's shape whose arguments follow its function's schema; returns the arguments."""
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] in allowed
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, allowed[call["function"]["name"]])
    return arguments


def raw_create(client, **kwargs) -> dict:
    """A chat completion as the JSON the server sent (validated against OpenAI's schema)."""
    body = client.chat.completions.with_raw_response.create(model=MODEL, **kwargs).http_response.json()
    assert_valid(body, "CreateChatCompletionResponse")
    return body


def check_choices(body: dict, *, most: int | None, allowed=SCHEMAS, content_allowed=False) -> int:
    """Every choice keeps the contract; returns how many ended with complete tool calls."""
    complete = 0
    for choice in body["choices"]:
        message = choice["message"]
        if choice["finish_reason"] == "tool_calls":
            assert message["content"] is None and message["tool_calls"]
            for call in message["tool_calls"]:
                check_call(call, allowed)
            assert most is None or len(message["tool_calls"]) <= most
            complete += 1
        elif choice["finish_reason"] == "stop":  # auto only: a plain answer
            assert content_allowed and isinstance(message["content"], str) and "tool_calls" not in message
        else:
            assert choice["finish_reason"] == "length"
    return complete


@pytest.mark.parametrize("tool_choice, parallel, most", [
    ("required", None, None),
    ("required", False, 1),
    ({"type": "function", "function": {"name": "record_total"}}, None, 1),
])  # fmt: skip
def test_forced_tool_calls_follow_the_function_schemas(client, tool_choice, parallel, most):
    allowed = SCHEMAS if isinstance(tool_choice, str) else {"record_total": SCHEMAS["record_total"]}
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    body = raw_create(client, messages=ASK, tools=TOOLS, tool_choice=tool_choice, n=8, temperature=1.0, seed=1,
                      max_tokens=ROOM, **extra)  # fmt: skip
    assert check_choices(body, most=most, allowed=allowed) >= 1  # the contract was exercised, not only cut off


def test_auto_answers_either_in_text_or_with_tool_calls(client):
    body = raw_create(client, messages=ASK, tools=TOOLS, n=8, temperature=1.0, seed=0, max_tokens=ROOM)
    check_choices(body, most=None, content_allowed=True)
    kinds = {"tool_calls" if c["message"].get("tool_calls") else "content" for c in body["choices"]}
    assert kinds == {"tool_calls", "content"}  # both branches of the envelope occur
    assert {c["finish_reason"] for c in body["choices"]} & {"tool_calls", "stop"}
    for choice in body["choices"]:  # a plain answer never shows the envelope
        assert not (choice["message"]["content"] or "").lstrip().startswith("{")
    none = raw_create(client, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert isinstance(none["choices"][0]["message"]["content"], str)
    assert "tool_calls" not in none["choices"][0]["message"]


def stream_raw(frontend, body: dict) -> list[dict]:
    with httpx.stream("POST", frontend.base_url + "/v1/chat/completions", json={"model": MODEL, **body, "stream": True},
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    return chunks


# One call of a function whose arguments are all enums and booleans: the grammar bounds the answer's length
# (the longest envelope is 92 characters with 28 gaps of at most 16 whitespace characters each, i.e. at most
# 540 tokens and the end token), so with this much room every answer ends, whatever the random weights do.
ONE_CALL = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 560}


def test_streamed_tool_calls_match_the_non_streamed_answer(client, frontend):
    request = {"messages": ASK, **ONE_CALL, "temperature": 0}
    whole = raw_create(client, **request)["choices"][0]
    chunks = stream_raw(frontend, request)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta_call in chunk["choices"][0]["delta"].get("tool_calls", []) if chunk["choices"] else []:
            call = calls.setdefault(delta_call["index"], {"id": delta_call.get("id"), "type": "function",
                                                          "function": {"name": None, "arguments": ""}})  # fmt: skip
            if "id" in delta_call:  # only a call's first delta carries id and name, as OpenAI streams them
                assert call["function"]["name"] is None
                call["function"]["name"] = delta_call["function"]["name"]
            call["function"]["arguments"] += delta_call["function"].get("arguments", "")
        assert not (chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
    streamed = [calls[i] for i in sorted(calls)]
    pieces = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
    assert pieces > len(streamed)  # arguments arrive in pieces as they are generated
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [whole["finish_reason"]]
    assert [c["function"] for c in streamed] == [c["function"] for c in whole["message"].get("tool_calls", [])]
    assert whole["finish_reason"] == "tool_calls" and len(streamed) == 1  # the answer ended (ONE_CALL's bound)
    check_call(streamed[0])
    check_call(whole["message"]["tool_calls"][0])


def test_sdk_parse_and_stream_helpers_give_parsed_arguments(client):
    named = {"type": "function", "function": {"name": "Lookup"}}
    parsed = []
    for seed in range(8):
        try:
            r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[LOOKUP], seed=seed, temperature=1.0,
                                              tool_choice=named, max_tokens=ROOM)  # fmt: skip
        except openai.LengthFinishReasonError:
            continue  # cut off by max_tokens: the SDK refuses to parse, as it should
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        assert isinstance(call.function.parsed_arguments, Lookup)
        assert call.function.parsed_arguments == Lookup.model_validate_json(call.function.arguments)
        parsed.append(seed)
    assert parsed

    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[LOOKUP], seed=parsed[0], temperature=1.0,
                                        tool_choice=named, max_tokens=ROOM) as stream:  # fmt: skip
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert events.count("tool_calls.function.arguments.delta") > 1 and "tool_calls.function.arguments.done" in events
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"  # the same seed as a non-streamed success
    assert call.function.parsed_arguments == Lookup.model_validate_json(call.function.arguments)


def test_tool_results_in_the_history_reach_the_prompt(client):
    def turn(result: str, **kwargs):
        return client.chat.completions.create(model=MODEL, tools=TOOLS, max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [image_part(page()), {"type": "text", "text": "Record this invoice."}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
                "name": "record_total", "arguments": '{"currency": "EUR", "paid": true}'}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": result},
            {"role": "user", "content": "Done?"}], **kwargs)  # fmt: skip

    short, long = turn("ok"), turn("recorded: invoice 4711, EUR 1,234.50, paid on 2026-11-30 by bank transfer")
    assert long.usage.prompt_tokens > short.usage.prompt_tokens > 64  # the result and the image are in the prompt
    plain = turn("ok", tool_choice="none")
    assert plain.usage.prompt_tokens < short.usage.prompt_tokens  # "none": the tools are not described


def test_bad_tools_are_400_with_param_and_the_server_keeps_serving(client):
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "strng"}}}}}]}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "delete_everything"}}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "not": {"const": 3}}}}}}]}, "tools[0].function.parameters"),  # not enforceable
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(?<=a)b"}}}}}], "tool_choice": "required"}, "tools"),  # the engine
        ({"tools": TOOLS, "logprobs": True}, "logprobs"),
    ]  # fmt: skip
    for extra, param in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, stream=stream, **extra)
            assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_langchain_function_calling_structured_output_and_bind_tools(frontend):
    from langchain_openai import ChatOpenAI

    def llm(seed: int) -> ChatOpenAI:
        return ChatOpenAI(model=MODEL, base_url=frontend.base_url + "/v1", api_key="unused", temperature=1.0,
                          seed=seed, max_tokens=ROOM, max_retries=0, timeout=120)  # fmt: skip

    results = []
    for seed in range(6):
        out = llm(seed).with_structured_output(Lookup, method="function_calling", include_raw=True).invoke(
            "What is the weather in Oslo?")
        finish = out["raw"].response_metadata["finish_reason"]
        if finish == "tool_calls":
            assert out["parsing_error"] is None and isinstance(out["parsed"], Lookup)
            assert out["parsed"] == Lookup.model_validate(out["raw"].tool_calls[0]["args"])
            results.append(out["parsed"])
            break
        else:
            assert finish == "length"
    assert results

    def record_total(currency: Literal["EUR", "USD"], paid: bool) -> str:
        """Record an invoice total."""
        return "ok"

    bound_schema = {"record_total": SCHEMAS["record_total"], "Lookup": SCHEMAS["Lookup"]}
    seen = 0
    for seed in range(4):
        message = llm(seed).bind_tools([record_total, Lookup], tool_choice="required").invoke("Record the total.")
        if message.response_metadata["finish_reason"] != "tool_calls":
            continue
        assert message.tool_calls and not message.invalid_tool_calls
        for call in message.tool_calls:
            assert call["id"].startswith("call_") and call["name"] in bound_schema
            schema = {**bound_schema[call["name"]]} if call["name"] == "Lookup" else None
            if schema is not None:
                jsonschema.validate(call["args"], schema)
            else:
                assert set(call["args"]) == {"currency", "paid"} and call["args"]["currency"] in ("EUR", "USD")
        seen += 1
        break
    assert seen
