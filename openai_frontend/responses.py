"""OpenAI's Responses API (``POST /v1/responses``) on top of the chat path.

A Responses request becomes a :class:`~openai_frontend.schemas.ChatCompletionRequest` (:func:`to_chat_request`)
and then the same GenerateRequest as a chat completion, so images, PDFs, limits, tools and JSON modes are the
chat path's. The answer comes back as a ``response`` object (:func:`build_response`); the stream's events are
in :mod:`openai_frontend.responses_stream`.

Input mapping: ``instructions`` and leading ``system``/``developer`` items -> the system message; messages
(``input_text``, ``input_image``, ``input_file``, our ``input_video`` extension, and ``output_text`` of earlier
assistant turns) -> chat messages with ``text``, ``image_url``, ``file`` and ``video_url`` parts;
``function_call`` items -> an assistant message's ``tool_calls``; ``function_call_output`` items -> ``tool``
messages. ``text.format`` -> ``response_format``,
``max_output_tokens`` -> ``max_completion_tokens``; function tools (flat shape) -> chat tools.

No server-side state: ``store`` must be false or left out, ``previous_response_id`` and ``conversation`` get
a 400 (send the whole conversation as ``input``).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openai_frontend import tools
from openai_frontend.errors import APIError, invalid
from openai_frontend.schemas import ChatCompletion, ChatCompletionRequest


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: OpenAI's fields, named as in its API reference, plus our chat extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    # Accepted, no effect on a local model.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    # --- extensions (as on chat completions)
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    max_slice_nums: int | None = Field(None, ge=1, le=36)


_EXTENSIONS = ("seed", "top_k", "repetition_penalty", "min_tokens", "ignore_eos", "max_slice_nums")
_SYSTEM = ("system", "developer")


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


# ---------------------------------------------------------------- request -> chat request


class _Converted:
    """The chat request plus where each chat message came from (for error params)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)


def to_chat_request(body: ResponsesRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """The equivalent chat request, and per chat message the Responses param it came from."""
    _refuse_state(body)
    out = _Converted()
    items: list[dict[str, Any]] = [{"role": "user", "content": body.input}] if isinstance(body.input, str) \
        else body.input  # fmt: skip
    system = [body.instructions] if body.instructions else []
    origin = "instructions"
    start = 0
    for k, item in enumerate(items):  # leading system / developer items join the instructions
        if not (isinstance(item, dict) and item.get("role") in _SYSTEM and item.get("type", "message") == "message"):
            break
        system.append(_text_only(item.get("content"), f"input[{k}].content"))
        origin = origin if body.instructions else f"input[{k}]"
        start = k + 1
    if system:
        out.add({"role": "system", "content": "\n\n".join(system)}, origin)
    for k in range(start, len(items)):
        _item(out, items[k], f"input[{k}]" if not isinstance(body.input, str) else "input")

    functions = tools.parse_functions(body.tools, "tools", flat=True)  # errors name the Responses params
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": out.messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": bool(body.stream),
        "tools": [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                    "parameters": f.parameters}} for f in functions] or None,
        "tool_choice": body.tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text),
        **{name: getattr(body, name) for name in _EXTENSIONS},
    }  # fmt: skip
    try:
        request = ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        raise invalid(f"input: {first.get('msg', 'invalid value')}", "input") from None
    return request, out.origins


def _refuse_state(body: ResponsesRequest) -> None:
    if body.store:
        raise invalid("this server keeps no responses: send store=false or leave it out", "store",
                      code="unsupported_parameter")  # fmt: skip
    for name in ("previous_response_id", "conversation"):
        if getattr(body, name) is not None:
            raise invalid(f"'{name}' is not supported: this server keeps no conversation state; send the whole "
                          "conversation as input", name, code="unsupported_parameter")  # fmt: skip
    if body.background:
        raise invalid("background responses are not supported", "background", code="unsupported_parameter")
    if body.prompt is not None:
        raise invalid("stored prompts are not supported", "prompt", code="unsupported_parameter")
    if body.top_logprobs:
        raise invalid("top_logprobs is not supported on /v1/responses", "top_logprobs", code="unsupported_parameter")


def _text_only(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                         for p in content):  # fmt: skip
        return "\n".join(str(p.get("text", "")) for p in content)
    raise invalid(f"{param}: expected text", param)


def _item(out: _Converted, item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an object", where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", *_SYSTEM):
            raise invalid(f"{where}.role must be user, assistant, system or developer, got {role!r}", f"{where}.role")
        out.add({"role": role, "content": _content(item.get("content"), role, f"{where}.content")}, where)
    elif kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise invalid(f"{where}.{name} is required (a string)", f"{where}.{name}")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
        previous = out.messages[-1] if out.messages else None
        if previous is not None and previous["role"] == "assistant" and previous.get("tool_calls"):
            previous["tool_calls"].append(call)  # parallel calls of one turn
        else:
            out.add({"role": "assistant", "content": None, "tool_calls": [call]}, where)
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise invalid(f"{where}.call_id is required (a string)", f"{where}.call_id")
        out.add({"role": "tool", "tool_call_id": item["call_id"],
                 "content": _text_only(item.get("output"), f"{where}.output")}, where)  # fmt: skip
    else:
        raise invalid(f"{where}.type: input items of type {kind!r} are not supported (use message, function_call "
                      "or function_call_output)", f"{where}.type", code="unsupported_input")  # fmt: skip


def _content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise invalid(f"{param}.text must be a string", f"{param}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and role == "assistant":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image":
            if not part.get("image_url"):
                raise invalid(f"{param}: send the image inline as image_url (a data: URL, or http(s) where the "
                              "server allows it); file ids are not supported", f"{param}.image_url",
                              code="unsupported_content")  # fmt: skip
            detail = part.get("detail") if part.get("detail") in ("low", "high") else "auto"
            image = {"url": part["image_url"], "detail": detail}
            if part.get("max_slice_nums") is not None:  # extension, as on chat completions' image_url
                image["max_slice_nums"] = part["max_slice_nums"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_video":  # extension: OpenAI's Responses API takes no video; chat's video_url part
            if not part.get("video_url"):
                raise invalid(f"{param}: send the video as video_url (a data: URL, or http(s) where the server "
                              "allows it)", f"{param}.video_url", code="unsupported_content")  # fmt: skip
            extra = {k: part[k] for k in ("fps", "max_frames", "max_slice_nums") if part.get(k) is not None}
            parts.append({"type": "video_url", "video_url": {"url": part["video_url"], **extra}})
        elif kind == "input_file":
            if not part.get("file_data"):
                raise invalid(f"{param}: send the file inline as file_data (a data: URL); file ids and file URLs "
                              "are not supported", f"{param}.file_data", code="unsupported_content")  # fmt: skip
            file = {"file_data": part["file_data"]}
            if part.get("filename"):
                file["filename"] = part["filename"]
            parts.append({"type": "file", "file": file})
        else:
            raise invalid(f"{param}.type: unsupported content type {kind!r} (use input_text, input_image, "
                          "input_file or input_video)", f"{param}.type", code="unsupported_content")  # fmt: skip
    return parts


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("text.format.type must be text, json_object or json_schema", "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    if not isinstance(fmt.get("schema"), dict):
        raise invalid("text.format.schema must be a JSON Schema object", "text.format.schema")
    spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


# Chat params -> Responses params, for errors the chat path raises.
_SUFFIXES = ((".image_url.url", ".image_url"), (".file.file_data", ".file_data"), (".file", ""))
_PARAMS = {"response_format": "text.format", "max_completion_tokens": "max_output_tokens"}


def restate(error: Exception, origins: list[str]) -> Exception:
    """An APIError from the chat path with its ``param`` named as in the Responses request."""
    if not isinstance(error, APIError) or not error.param:
        return error
    param = error.param
    match = re.match(r"^messages\[(\d+)\](.*)$", param)
    if match and int(match.group(1)) < len(origins):
        rest = match.group(2)
        for old, new in _SUFFIXES:
            if rest.endswith(old):
                rest = rest[: -len(old)] + new
                break
        param = origins[int(match.group(1))] + (rest if origins[int(match.group(1))] != "instructions" else "")
    elif param.startswith("messages"):
        param = "input"
    elif param.split(".")[0] in _PARAMS:
        param = _PARAMS[param.split(".")[0]] + param[len(param.split(".")[0]):]
    message = error.message.replace(error.param, param) if error.param in error.message else error.message
    return APIError(error.status, message, type=error.type, param=param, code=error.code)


# ---------------------------------------------------------------- the response object


def echo(body: ResponsesRequest, rid: str, created: float) -> dict[str, Any]:
    """The fields of a response object that echo the request (status, output and usage come on top)."""
    functions = tools.parse_functions(body.tools, "tools", flat=True)
    fmt = (body.text or {}).get("format") or {"type": "text"}
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "temperature": body.temperature,
        "text": {"format": fmt},
        "tool_choice": body.tool_choice if body.tool_choice is not None else ("auto" if functions else "none"),
        "tools": [{"type": "function", "name": f.name, "description": f.description, "parameters": f.parameters,
                   "strict": True} for f in functions],
        "top_p": body.top_p,
        "truncation": "disabled",
        "metadata": body.metadata or {},
    }  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text)] if status != "in_progress" else []}  # fmt: skip


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}  # fmt: skip


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def finish(response: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    """Mark a response completed, or incomplete when the answer was cut off by max_output_tokens."""
    cut = finish_reason == "length"
    response["status"] = "incomplete" if cut else "completed"
    response["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
    response["completed_at"] = time.time() if not cut else None
    return response


def build_response(body: ResponsesRequest, rid: str, created: float, completion: ChatCompletion) -> dict[str, Any]:
    """A finished chat completion -> the response object."""
    response = echo(body, rid, created)
    (choice,) = completion.choices
    message = choice.message
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    if message.tool_calls:
        response["output"] = [call_item(item_id("fc"), c.id, c.function.name, c.function.arguments, status)
                              for c in message.tool_calls]  # fmt: skip
    elif message.content is None:  # calls were required, and the answer was cut off before the first one
        response["output"] = []
    else:
        response["output"] = [message_item(item_id("msg"), message.content or "", status)]
    response["usage"] = usage(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    return finish(response, choice.finish_reason)
