"""Function calling without Triton: the tool-call envelope's schema (compiled by xgrammar, as the engine does),
reading the envelope as it streams, the prompt rendering of tools and earlier calls, and request checks."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import xgrammar

from openai_frontend import tools
from openai_frontend.convert import to_generate_request
from openai_frontend.errors import APIError
from openai_frontend.schemas import ChatCompletionRequest
from openai_frontend.settings import Settings

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
# A pydantic model's schema as openai.pydantic_function_tool writes it: local $refs into $defs, and recursion.
NESTED = {"type": "function", "function": {"name": "file_invoice", "strict": True, "parameters": {
    "$defs": {"Line": {"type": "object", "properties": {"item": {"type": "string"}, "qty": {"type": "integer"},
                                                       "sub": {"type": "array", "items": {"$ref": "#/$defs/Line"}}},
                       "required": ["item", "qty", "sub"], "additionalProperties": False}},
    "type": "object", "properties": {"lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}},
                                     "paid": {"type": "boolean"}},
    "required": ["lines", "paid"], "additionalProperties": False}}}  # fmt: skip
COMPILER = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo(["a"]))


def plan_of(tool_list, choice=None, parallel=None, response_format=None):
    return tools.plan_tools(tools.parse_functions(tool_list), choice, parallel, response_format)


def accepts(schema: dict, text: str) -> bool:
    """Whether the engine's grammar (xgrammar, strict mode, as minicpmv/engine/structured.py compiles it)
    admits ``text`` as a whole answer."""
    grammar = COMPILER.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True,
                                           max_whitespace_cnt=16)  # fmt: skip
    matcher = xgrammar.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.is_completed()


def call(name, arguments):
    return {"name": name, "arguments": arguments}


def envelope(*calls):
    return json.dumps({"tool_calls": list(calls)})


# ---------------------------------------------------------------- the envelope's grammar


def test_required_envelope_admits_exactly_calls_that_follow_the_schemas():
    schema = plan_of([WEATHER, NESTED], "required").response_format()["json_schema"]["schema"]
    good = call("get_weather", {"city": "Oslo", "unit": "C"})
    lines = {"lines": [{"item": "a", "qty": 1, "sub": [{"item": "b", "qty": 2, "sub": []}]}], "paid": True}
    assert accepts(schema, envelope(good))
    assert accepts(schema, envelope(good, call("file_invoice", lines)))  # parallel calls by default
    assert not accepts(schema, envelope(call("get_weather", {"city": "Oslo", "unit": "K"})))  # enum
    assert not accepts(schema, envelope(call("get_weather", {"city": "Oslo"})))  # required
    assert not accepts(schema, envelope(call("get_weather", {"city": "Oslo", "unit": "C", "x": 1})))  # extra
    assert not accepts(schema, envelope(call("delete_all", {})))  # unknown function
    assert not accepts(schema, envelope(call("file_invoice", {"lines": [{"item": "a", "qty": "1", "sub": []}],
                                                              "paid": True})))  # nested $ref type  # fmt: skip
    assert not accepts(schema, json.dumps({"tool_calls": []}))  # at least one call
    assert not accepts(schema, json.dumps({"content": "hello"}))  # no plain answer when calls are required


def test_parallel_false_and_named_choice_allow_exactly_one_call():
    good = call("get_weather", {"city": "Oslo", "unit": "F"})
    single = plan_of([WEATHER, NESTED], "required", parallel=False).response_format()["json_schema"]["schema"]
    assert accepts(single, envelope(good)) and not accepts(single, envelope(good, good))
    named = plan_of([WEATHER, NESTED], {"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and [f.name for f in named.functions] == ["get_weather"]
    schema = named.response_format()["json_schema"]["schema"]
    assert accepts(schema, envelope(good)) and not accepts(schema, envelope(good, good))
    assert not accepts(schema, envelope(call("file_invoice", {"lines": [], "paid": False})))


def test_auto_admits_a_plain_answer_or_calls():
    plan = plan_of([WEATHER])
    assert plan.mode == "auto"
    schema = plan.response_format()["json_schema"]["schema"]
    assert accepts(schema, json.dumps({"content": "It is sunny."}))
    assert accepts(schema, envelope(call("get_weather", {"city": "Oslo", "unit": "C"})))
    assert not accepts(schema, json.dumps({"content": 3}))
    assert not accepts(schema, "It is sunny.")


def test_auto_with_a_json_schema_response_format_puts_that_json_in_content():
    answer = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"],
              "additionalProperties": False}  # fmt: skip
    plan = plan_of([WEATHER], "auto", response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                                               "schema": answer}})
    schema = plan.response_format()["json_schema"]["schema"]
    assert accepts(schema, json.dumps({"content": {"total": 12.5}}))
    assert not accepts(schema, json.dumps({"content": "12.5"}))
    reader = tools.EnvelopeReader(plan)
    reader.feed('{"content": {"total": 12.5}}')
    assert reader.finish("stop") == tools.Outcome('{"total":12.5}', [], True, "stop")


def test_allowed_tools_restricts_the_callable_functions():
    plan = plan_of([WEATHER, NESTED], {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "file_invoice"}}]}})  # fmt: skip
    assert plan.mode == "required" and [f.name for f in plan.functions] == ["file_invoice"]
    assert plan_of([WEATHER], "none") is None and plan_of(None) is None


# ---------------------------------------------------------------- request checks


@pytest.mark.parametrize(
    "tool_list, choice, param, message",
    [
        ([{"type": "custom", "custom": {"name": "x"}}], None, "tools[0].type", "only function tools"),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name", "1-64"),
        ([WEATHER, WEATHER], None, "tools[1].function.name", "used twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None,
         "tools[0].function.parameters", "object schema"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "strng"}}}}}], None, "tools[0].function.parameters", "not a valid JSON Schema"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"$ref": "https://example.com/s.json"}}}}}], None, "tools[0].function.parameters", "local $ref"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "not": {"const": 3}}}}}}], None, "tools[0].function.parameters", "'not'"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$defs": {"L": {
            "type": "array", "uniqueItems": True}}}}}], None, "tools[0].function.parameters", "'uniqueItems'"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"allOf": [{"type": "integer"}, {"minimum": 3}]}}}}}], None, "tools[0].function.parameters",
         "'allOf'"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "no function named"),
        ([WEATHER], "sometimes", "tool_choice", "must be"),
        (None, "required", "tool_choice", "requires tools"),
    ],
)  # fmt: skip
def test_bad_tools_are_400_naming_the_parameter(tool_list, choice, param, message):
    with pytest.raises(APIError) as e:
        plan_of(tool_list, choice)
    assert e.value.status == 400 and e.value.param == param and message in e.value.message


def convert(body: dict):
    request = ChatCompletionRequest.model_validate({"model": "m", **body})
    return asyncio.run(to_generate_request(request, Settings()))


def test_logprobs_with_tools_and_legacy_functions_are_400():
    with pytest.raises(APIError) as e:
        convert({"messages": [{"role": "user", "content": "q"}], "tools": [WEATHER], "logprobs": True})
    assert e.value.param == "logprobs"
    with pytest.raises(APIError) as e:
        convert({"messages": [{"role": "user", "content": "q"}], "functions": [{"name": "f"}]})
    assert e.value.param == "functions"


def test_grammar_failures_are_restated_against_the_tools():
    error = APIError(400, "response_format.json_schema.schema is not supported: bad keyword")
    restated = tools.explain_error(error, plan_of([WEATHER]))
    assert restated.param == "tools" and "bad keyword" in restated.message
    assert tools.explain_error(error, None) is error


# ---------------------------------------------------------------- reading the envelope


def read_in_pieces(plan, text, size):
    reader = tools.EnvelopeReader(plan)
    events = []
    for start in range(0, len(text), size):
        events += reader.feed(text[start:start + size])
    return reader, events


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_content_decodes_escapes_and_surrogate_pairs_at_any_cut(size):
    answer = 'Tab\there, "quoted" \\ slash, \u00e9t\u00e9, emoji \U0001f600 and \u4e2d\u6587.'
    text = '{ "content" :  ' + json.dumps(answer) + " }"  # ASCII escapes, \ud83d\ude00 included
    reader, events = read_in_pieces(plan_of([WEATHER]), text, size)
    assert all(isinstance(e, tools.ContentDelta) for e in events)
    assert "".join(e.text for e in events) == answer
    assert reader.kind == "content" and reader.finish("stop") == tools.Outcome(answer, [], True, "stop")


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_streamed_calls_carry_ids_names_and_the_compacted_arguments(size):
    first = '{ "city" :\n "Oslo, \\"NO\\"",\t"unit": "C" }'
    second = '{"lines": [{"item": "}] x", "qty": 2, "sub": []}], "paid": false}'
    # the arguments as generated, less the whitespace between tokens (never inside strings)
    compact = ['{"city":"Oslo, \\"NO\\"","unit":"C"}', '{"lines":[{"item":"}] x","qty":2,"sub":[]}],"paid":false}']
    text = '{"tool_calls": [ {"name": "get_weather", "arguments": ' + first + '},\n{"name": "file_invoice", ' \
           '"arguments":' + second + "}]}"  # fmt: skip
    reader, events = read_in_pieces(plan_of([WEATHER, NESTED], "required"), text, size)
    started = [e for e in events if isinstance(e, tools.CallStarted)]
    assert [(e.index, e.name) for e in started] == [(0, "get_weather"), (1, "file_invoice")]
    assert all(e.id.startswith("call_") and len(e.id) == 29 for e in started) and started[0].id != started[1].id
    for index, expected in enumerate(compact):
        pieces = [e.text for e in events if isinstance(e, tools.ArgumentsDelta) and e.index == index]
        assert "".join(pieces) == expected
    # a call's arguments only stream after its start event
    order = [(type(e).__name__, e.index) for e in events if not isinstance(e, tools.ContentDelta)]
    assert order.index(("CallStarted", 1)) < order.index(("ArgumentsDelta", 1))
    outcome = reader.finish("stop")
    assert outcome.finish_reason == "tool_calls" and outcome.content is None and outcome.complete
    assert [(c.id, c.name, json.loads(c.arguments)) for c in outcome.calls] == \
        [(started[0].id, "get_weather", json.loads(first)), (started[1].id, "file_invoice", json.loads(second))]


def test_a_cut_off_envelope_reports_length_not_tool_calls():
    text = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Os'
    reader, _ = read_in_pieces(plan_of([WEATHER], "required"), text, 5)
    outcome = reader.finish("length")
    assert outcome.finish_reason == "length" and not outcome.complete
    assert [(c.name, c.arguments) for c in outcome.calls] == [("get_weather", '{"city":"Os')]
    reader, _ = read_in_pieces(plan_of([WEATHER]), '{"content": "unfinished \\u00', 3)
    assert reader.finish("length") == tools.Outcome("unfinished ", [], False, "length")
    reader, _ = read_in_pieces(plan_of([WEATHER], "required"), '{"tool', 3)
    assert reader.finish("length") == tools.Outcome(None, [], False, "length")  # calls are all it can be


def test_keywords_that_decoding_enforces_or_that_are_only_names_are_accepted():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "boolean"},
                                               "tags": {"type": "array", "items": {"type": "string"},
                                                        "uniqueItems": False, "maxItems": 3},
                                               "kind": {"oneOf": [{"const": "a"}, {"const": "b"}]},
                                               "ref": {"allOf": [{"$ref": "#/$defs/R"}]}},
              "$defs": {"R": {"type": "integer", "minimum": 1}}}  # fmt: skip
    (function,) = tools.parse_functions([{"type": "function", "function": {"name": "f", "parameters": schema}}])
    assert function.parameters == schema


# ---------------------------------------------------------------- the prompt


def test_tools_are_described_in_the_system_prompt_in_a_fixed_layout():
    plan = plan_of([WEATHER], "required", parallel=False)
    messages = tools.add_system_prompt([{"role": "system", "content": "You read invoices."},
                                        {"role": "user", "content": "q"}], plan)  # fmt: skip
    prompt = messages[0]["content"]
    assert prompt.startswith("You read invoices.\n\n# Tools\n")
    assert "## get_weather\nWeather for a city.\nArguments (JSON Schema): " + json.dumps(
        WEATHER["function"]["parameters"]) in prompt
    assert '{"tool_calls": [{"name": "<function name>", "arguments": {' in prompt
    assert "You must call exactly one function." in prompt and '"Tool results:"' in prompt
    auto = tools.add_system_prompt([{"role": "user", "content": "q"}], plan_of([WEATHER]))
    assert auto[0]["role"] == "system" and '{"content": "<your answer>"}' in auto[0]["content"]


def test_earlier_calls_and_results_are_rendered_into_the_conversation():
    arguments = '{"city": "Oslo", "unit": "C"}'
    g = convert({"tools": [WEATHER], "tool_choice": "none", "messages": [
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "9 C"}]},
        {"role": "user", "content": "Which is warmer?"}]})  # fmt: skip
    assert g.tools is None and "response_format" not in g.sampling  # "none": plain text, tools not described
    assert g.messages == [
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "content": json.dumps({"tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}},
            {"name": "get_weather", "arguments": {}}]})},
        {"role": "user", "content": "Tool results:\nResult of get_weather (call call_1):\n12 C\n\n"
                                    "Result of get_weather (call call_2):\n9 C"},
        {"role": "user", "content": "Which is warmer?"},
    ]  # fmt: skip


def test_a_tool_request_is_decoded_under_the_envelope_without_stop_sequences():
    g = convert({"tools": [WEATHER], "tool_choice": "required", "stop": ["}"], "messages": [
        {"role": "user", "content": "Weather in Oslo?"}]})  # fmt: skip
    assert isinstance(g.tools, tools.ToolPlan) and "stop" not in g.sampling
    response_format = g.sampling["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["schema"] == tools.envelope_schema(g.tools)
    jsonschema.Draft202012Validator.check_schema(response_format["json_schema"]["schema"])
    assert g.messages[0]["role"] == "system" and "## get_weather" in g.messages[0]["content"]
