"""Function calling for a model that was not trained on a tool format.

MiniCPM-V 2.6 never saw tool calls in training, so the frontend makes them a matter of constrained decoding:

* The tools are described in the system prompt in one fixed layout (:func:`system_prompt`): each function's
  name, description and JSON Schema, then the answer format.
* The answer is constrained (through the engine's ``response_format`` json_schema path, i.e. xgrammar) to an
  *envelope*, one JSON object: ``{"tool_calls": [{"name": "<function>", "arguments": {...}}, ...]}`` where
  each call's ``arguments`` follow that function's ``parameters`` schema, or, for ``tool_choice: "auto"``,
  alternatively ``{"content": "<plain answer>"}`` (with a structured ``response_format``, ``content`` holds
  the JSON value that format asks for). :func:`envelope_schema` builds that schema.
* :class:`EnvelopeReader` (in :mod:`openai_frontend.tool_stream`) reads the envelope as it streams and turns
  it into OpenAI's shapes: content deltas, or tool calls (ids ``call_...``, ``arguments`` the JSON text of the
  arguments object as generated, less the whitespace between tokens).
* Earlier turns are rendered in the same format: an assistant message's ``tool_calls`` become the envelope
  JSON it would have produced, and ``tool`` messages (results) become one user message starting with
  ``Tool results:`` (:func:`render_tool_calls`, :func:`render_tool_results`).

``tool_choice``: ``"none"`` (plain text, no constraint, tools not described), ``"auto"`` (the default
when tools are given: answer or call), ``"required"`` (one or more calls), ``{"type": "function",
"function": {"name": ...}}`` (exactly one call of that function), ``{"type": "allowed_tools", ...}``
(auto or required over a subset). ``parallel_tool_calls: false`` allows exactly one call per answer.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from openai_frontend.errors import invalid
from openai_frontend.tool_stream import (  # noqa: F401 - the reader is part of this module's interface
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    EnvelopeReader,
    Outcome,
    ToolCall,
    call_id,
)

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RESULTS_HEADER = "Tool results:"


@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass
class ToolPlan:
    """What a request's tools mean for decoding: ``mode`` is "auto", "required" or "named" (never "none":
    that is no plan at all). ``functions`` are the callable ones (one for "named")."""

    mode: str
    functions: list[Function]
    parallel: bool = True
    content_format: dict[str, Any] | None = None  # auto + structured response_format: the content's format
    all_functions: list[Function] = field(default_factory=list)  # for names of earlier calls in the prompt

    @property
    def structured_content(self) -> bool:
        return self.content_format is not None

    def response_format(self) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": envelope_schema(self),
                                                       "strict": True}}  # fmt: skip


# ---------------------------------------------------------------- request -> plan


def parse_functions(tools: list[Any] | None, param: str = "tools", flat: bool = False) -> list[Function]:
    """OpenAI's tool list -> functions. ``flat``: the Responses API's shape (name, parameters at the top)."""
    if not tools:
        return []
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"{where} must be an object", where)
        if tool.get("type") != "function":
            raise invalid(f"{where}.type: only function tools are supported, got {tool.get('type')!r}",
                          f"{where}.type", code="unsupported_tool_type")  # fmt: skip
        spec, at = (tool, where) if flat else (tool.get("function"), f"{where}.function")
        if not isinstance(spec, dict):
            raise invalid(f"{at} must be an object with a name", at)
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(f"{at}.name must be 1-64 characters of a-z, A-Z, 0-9, '_' and '-', got {name!r}",
                          f"{at}.name")  # fmt: skip
        if any(f.name == name for f in functions):
            raise invalid(f"{at}.name: the function name '{name}' is used twice", f"{at}.name")
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{at}.description must be a string", f"{at}.description")
        functions.append(Function(name, description, _parameters(spec.get("parameters"), f"{at}.parameters")))
    return functions


def _parameters(schema: Any, param: str) -> dict[str, Any]:
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON Schema object", param, code="invalid_function_parameters")
    if schema.get("type", "object") != "object":
        raise invalid(f"{param}: a function's parameters must be an object schema (\"type\": \"object\"), got "
                      f"{schema.get('type')!r}", param, code="invalid_function_parameters")  # fmt: skip
    check_schema(schema, param)
    return {"type": "object", **schema}


def check_schema(schema: dict[str, Any], param: str) -> None:
    """400 unless ``schema`` is a valid JSON Schema (2020-12 meta-schema) with local ``$ref``s only."""
    import jsonschema  # imported here: only tool requests need it

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise invalid(f"{param}{where}: not a valid JSON Schema: {e.message}", param,
                      code="invalid_function_parameters") from None  # fmt: skip
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise invalid(f"{param}: only local $ref ('#/...') is supported, got {ref!r}", param,
                          code="invalid_function_parameters")  # fmt: skip
    unenforced = _unenforced(schema)
    if unenforced:
        raise invalid(f"{param}: the JSON Schema keyword '{unenforced}' can't be enforced while decoding, so the "
                      "arguments could break it; leave it out (or check it in your code)", param,
                      code="invalid_function_parameters")  # fmt: skip


# Keywords the grammar compiler (xgrammar) accepts but does not enforce: arguments could break them.
_UNENFORCED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "contains", "propertyNames", "not", "if", "then", "else",
               "unevaluatedProperties", "unevaluatedItems")  # fmt: skip


def _unenforced(schema: Any) -> str | None:
    """The first keyword of ``schema`` (or its subschemas) that decoding would not enforce, or None."""
    if not isinstance(schema, dict):
        return None
    for key in _UNENFORCED:
        if key in schema:
            return key
    if schema.get("uniqueItems") is True:
        return "uniqueItems"
    for key in ("unevaluatedProperties", "unevaluatedItems"):
        if key in schema and schema[key] is not True:
            return key
    if len(schema.get("allOf") or []) > 1:
        return "allOf"
    subschemas = [s for key in _SCHEMA_MAPS if isinstance(schema.get(key), dict) for s in schema[key].values()]
    subschemas += [s for key in _SCHEMA_LISTS if isinstance(schema.get(key), list) for s in schema[key]]
    subschemas += [schema[key] for key in _SCHEMA_ONE if key in schema]
    return next((found for s in subschemas if (found := _unenforced(s)) is not None), None)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for key, value in node.items() if key not in ("enum", "const") for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def plan_tools(functions: list[Function], tool_choice: Any, parallel: bool | None,
               response_format: dict[str, Any] | None, param: str = "tool_choice") -> ToolPlan | None:  # fmt: skip
    """The decoding plan for a request, or None for plain text (no tools, or ``tool_choice: "none"``)."""
    if tool_choice is not None and not functions:
        if tool_choice == "none":
            return None
        raise invalid(f"{param} requires tools", param)
    if not functions:
        return None
    choice = "auto" if tool_choice is None else tool_choice
    selected = functions
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            # Chat: {"type": "function", "function": {"name": ...}}; Responses: {"type": "function", "name": ...}
            name = (choice.get("function") or {}).get("name") if "function" in choice else choice.get("name")
            selected = [f for f in functions if f.name == name]
            if not selected:
                raise invalid(f"{param}: no function named {name!r} among the tools", param)
            choice = "named"
        elif kind == "allowed_tools":
            # Chat nests the fields under "allowed_tools"; Responses has them at the top.
            spec = choice.get("allowed_tools", choice)
            mode, allowed = spec.get("mode"), spec.get("tools")
            if mode not in ("auto", "required") or not isinstance(allowed, list) or not allowed:
                raise invalid(f"{param}: allowed_tools needs mode 'auto' or 'required' and a list of tools", param)
            names = set()
            for entry in allowed:
                entry = entry if isinstance(entry, dict) else {}
                name = (entry.get("function") or {}).get("name") if "function" in entry else entry.get("name")
                if not any(f.name == name for f in functions):
                    raise invalid(f"{param}: allowed_tools names {name!r}, which is not among the tools", param)
                names.add(name)
            selected = [f for f in functions if f.name in names]
            choice = mode
        else:
            raise invalid(f"{param}: unsupported tool_choice type {kind!r} (use 'none', 'auto', 'required' or "
                          "a function)", param)  # fmt: skip
    if choice == "none":
        return None
    if choice not in ("auto", "required", "named"):
        raise invalid(f"{param} must be 'none', 'auto', 'required' or a function, got {choice!r}", param)
    content_format = None
    if choice == "auto" and response_format and response_format.get("type") in ("json_object", "json_schema"):
        content_format = response_format
    return ToolPlan(choice, selected, parallel is not False and choice != "named", content_format, functions)


# ---------------------------------------------------------------- the envelope's JSON Schema


def _relocated(schema: dict[str, Any], base: str) -> dict[str, Any]:
    """A copy of ``schema`` whose local ``$ref``s point into ``#/$defs/<base>`` (where it will live)."""

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                    out[key] = f"#/$defs/{base}" + value[1:]
                elif key in ("enum", "const"):
                    out[key] = copy.deepcopy(value)
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def envelope_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON Schema the answer is decoded under (see the module's docstring)."""
    defs: dict[str, Any] = {}
    calls = []
    for k, function in enumerate(plan.functions):
        defs[f"tool_{k}"] = _relocated(function.parameters, f"tool_{k}")
        calls.append({"type": "object", "properties": {"name": {"const": function.name},
                                                       "arguments": {"$ref": f"#/$defs/tool_{k}"}},
                      "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                             "minItems": 1}  # fmt: skip
    if not plan.parallel:
        array["maxItems"] = 1
    tool_calls = {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
                  "additionalProperties": False}  # fmt: skip
    if plan.mode != "auto":
        return {**tool_calls, "$defs": defs}
    fmt = plan.content_format
    if fmt is None:
        content: dict[str, Any] = {"type": "string"}
    elif fmt.get("type") == "json_object":
        content = {"type": "object"}
    else:
        defs["response"] = _relocated((fmt.get("json_schema") or {}).get("schema") or {}, "response")
        content = {"$ref": "#/$defs/response"}
    answer = {"type": "object", "properties": {"content": content}, "required": ["content"],
              "additionalProperties": False}  # fmt: skip
    return {"anyOf": [answer, tool_calls], "$defs": defs}


# ---------------------------------------------------------------- the prompt


def system_prompt(plan: ToolPlan) -> str:
    """The fixed tool section appended to the system prompt."""
    lines = ["# Tools", "", "You can call the following functions. Each is listed with its name, what it does, "
             "and the JSON Schema of its arguments.", ""]  # fmt: skip
    for function in plan.functions:
        lines.append(f"## {function.name}")
        if function.description:
            lines.append(function.description.strip())
        lines.append("Arguments (JSON Schema): " + json.dumps(function.parameters, ensure_ascii=False))
        lines.append("")
    lines += ["# Answer format", "", "To call functions, answer with one JSON object and nothing else:",
              '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments following its schema>}}]}']
    if plan.mode == "named":
        lines.append(f'You must call the function "{plan.functions[0].name}", exactly once.')
    else:
        if plan.mode == "required":
            lines.append("You must call at least one function." if plan.parallel else
                         "You must call exactly one function.")  # fmt: skip
        else:
            lines.append("You may call several functions at once, one entry each in tool_calls." if plan.parallel
                         else "Call at most one function per answer.")  # fmt: skip
            if plan.structured_content:
                lines.append('To answer without calling a function, answer with {"content": <your answer as '
                             "JSON in the requested format>}.")  # fmt: skip
            else:
                lines.append('To answer without calling a function, answer with {"content": "<your answer>"}.')
    lines.append(f'Results of function calls come back in a user message that starts with "{RESULTS_HEADER}".')
    return "\n".join(lines)


def add_system_prompt(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """``messages`` (backend form) with the tool section at the end of the system message (one is added
    first if there is none)."""
    section = system_prompt(plan)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = first["content"]
        if isinstance(content, str):
            merged: str | list = f"{content}\n\n{section}" if content else section
        else:
            merged = [*content, {"type": "text", "text": section}]
        return [{**first, "content": merged}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def render_tool_calls(text: str, calls: list[dict[str, Any]], param: str) -> str:
    """An earlier assistant turn with ``tool_calls`` (OpenAI's shape) -> the envelope text it stands for."""
    rendered = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"{where} must be a function call with function.name and function.arguments", where)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise invalid(f"{where}.function.arguments must be a string (JSON)", f"{where}.function.arguments")
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            value = arguments  # kept as the string the client sent
        rendered.append({"name": function["name"], "arguments": value})
    envelope = json.dumps({"tool_calls": rendered}, ensure_ascii=False)
    return f"{text}\n{envelope}" if text else envelope


def render_tool_results(results: list[tuple[str, str | None, str]]) -> str:
    """(call id, function name or None, content) of consecutive tool messages -> one user message's text."""
    blocks = [f"Result of {name} (call {cid}):\n{content}" if name else f"Result of call {cid}:\n{content}"
              for cid, name, content in results]  # fmt: skip
    return RESULTS_HEADER + "\n" + "\n\n".join(blocks)


def explain_error(error: Exception, plan: ToolPlan | None) -> Exception:
    """A grammar failure the engine reports against response_format, restated against the tools when the
    format was the tool-call envelope (e.g. a schema keyword the grammar compiler does not support)."""
    from openai_frontend.errors import APIError, to_api_error

    api = to_api_error(error)
    if plan is None or api.status != 400 or "response_format" not in api.message:
        return error
    reason = api.message.split(": ", 1)[-1] if "not supported" in api.message else api.message
    return APIError(400, f"tools: a function's parameters schema can't be used for constrained decoding: {reason}",
                    param="tools", code="invalid_function_parameters")  # fmt: skip
