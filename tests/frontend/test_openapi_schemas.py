"""tests/frontend/openapi_schemas.py itself (no server): it finds what OpenAI's schemas forbid, and is strict
about fields the spec does not declare, through $ref, allOf, anyOf and OpenAPI's ``nullable``."""

from __future__ import annotations

import json

import pytest

from tests.frontend.openapi_schemas import FIXTURE, assert_valid, errors, schema, schema_names

COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp_x",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "system_fingerprint": "f",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}]}  # fmt: skip


def test_the_fixture_records_its_source():
    source = json.loads(FIXTURE.read_text())["source"]
    assert source["repository"] == "https://github.com/openai/openai-openapi" and len(source["commit"]) == 40
    assert {"CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "Response",
            "ResponseStreamEvent", "ErrorResponse"} <= set(schema_names())  # fmt: skip


def test_valid_objects_pass():
    assert_valid(COMPLETION, "CreateChatCompletionResponse")
    assert_valid(CHUNK, "CreateChatCompletionStreamResponse")
    assert_valid({"error": {"message": "m", "type": "t", "param": None, "code": None}}, "ErrorResponse")


@pytest.mark.parametrize(("change", "where"), [
    (lambda c: c.pop("created"), "created"),
    (lambda c: c.update(object="chat.completions"), "object"),
    (lambda c: c["choices"][0].update(finish_reason="eos"), "choices/0/finish_reason"),
    (lambda c: c["choices"][0].pop("logprobs"), "logprobs"),  # required, nullable
    (lambda c: c["usage"].update(total_tokens="2"), "usage/total_tokens"),
    (lambda c: c.update(extension=1), "extension"),  # strict: an undeclared field
    (lambda c: c["choices"][0]["message"].update(reasoning="x"), "reasoning"),  # strict, through a $ref
])  # fmt: skip
def test_what_the_spec_forbids_is_found(change, where):
    broken = json.loads(json.dumps(COMPLETION))
    change(broken)
    found = errors(broken, "CreateChatCompletionResponse")
    assert found and any(where in line for line in found), found
    with pytest.raises(AssertionError, match="not a valid CreateChatCompletionResponse"):
        assert_valid(broken, "CreateChatCompletionResponse")


def test_strictness_can_be_relaxed_for_extensions():
    model = {"id": "m", "object": "model", "created": 0, "owned_by": "o", "root": "m", "aliases": []}
    assert errors(model, "Model") and not errors(model, "Model", strict=False)


def test_strict_mode_keeps_all_of_composition_open():
    # Response = allOf(ModelResponseProperties, ResponseProperties, {...}): fields of every part count as
    # declared, a field of none does not, and an error in a nested item is reported where it is.
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
                "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}]}],
                "parallel_tool_calls": False, "tool_choice": "auto", "tools": [], "error": None,
                "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0,
                "top_p": 1.0}  # fmt: skip
    assert_valid(response, "Response")
    assert any("'junk' was unexpected" in e for e in errors({**response, "junk": 1}, "Response"))
    del response["output"][0]["content"][0]["logprobs"]
    assert "output/0/content/0: 'logprobs' is a required property" in errors(response, "Response")


def test_openapi_nullable_means_or_null():
    # CreateChatCompletionStreamResponse's choices[].logprobs is written with OpenAPI 3.0's nullable: true
    nullable = schema("CreateChatCompletionStreamResponse")["properties"]["choices"]["items"]["properties"]
    assert {"type": "null"} in nullable["logprobs"]["anyOf"]
    assert_valid(CHUNK, "CreateChatCompletionStreamResponse")


def test_unknown_schema_names_are_a_clear_error():
    with pytest.raises(KeyError, match="ROOTS"):
        assert_valid({}, "NoSuchSchema")
