"""The Responses API's stream: the backend's chunks -> OpenAI's typed SSE events, in the order the SDK's
``client.responses.stream(...)`` accumulates them.

``response.created``, ``response.in_progress``; per output item ``response.output_item.added``, then for a
message ``response.content_part.added``, ``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, or for a function call ``response.function_call_arguments.delta``...,
``response.function_call_arguments.done``; then ``response.output_item.done``; finally
``response.completed`` (or ``response.incomplete`` when max_output_tokens cut the answer off). Every event
carries ``type`` and a ``sequence_number`` counting from 0. An error after the stream started is an
``error`` event, and the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from openai_frontend import tools
from openai_frontend.backend import GenerateChunk
from openai_frontend.errors import to_api_error
from openai_frontend.responses import (
    ResponsesRequest,
    call_item,
    echo,
    finish,
    item_id,
    message_item,
    text_part,
    usage,
)


class _Events:
    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Output:
    """The output items so far, and the one being written."""

    def __init__(self, event: _Events):
        self.event = event
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None

    def _add(self, item: dict[str, Any]) -> str:
        self.open = item
        self.items.append(item)
        return self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))

    def text(self, delta: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self.close("completed")
            events.append(self._add(message_item(item_id("msg"), "", "in_progress")))
            self.open["text"] = ""
            index = len(self.items) - 1
            events.append(self.event("response.content_part.added", item_id=self.open["id"], output_index=index,
                                     content_index=0, part=text_part("")))  # fmt: skip
        if delta:
            self.open["text"] += delta
            events.append(self.event("response.output_text.delta", item_id=self.open["id"],
                                     output_index=len(self.items) - 1, content_index=0, delta=delta,
                                     logprobs=[]))  # fmt: skip
        return events

    def call(self, call_id: str, name: str) -> list[str]:
        events = self.close("completed")
        events.append(self._add(call_item(item_id("fc"), call_id, name, "", "in_progress")))
        return events

    def arguments(self, delta: str) -> list[str]:
        self.open["arguments"] += delta
        return [self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                           output_index=len(self.items) - 1, delta=delta)]  # fmt: skip

    def close(self, status: str) -> list[str]:
        item, index = self.open, len(self.items) - 1
        if item is None:
            return []
        self.open = None
        events = []
        if item["type"] == "message":
            text = item.pop("text")
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=text, logprobs=[]))  # fmt: skip
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=text_part(text)))  # fmt: skip
            item.update(message_item(item["id"], text, status))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=item["arguments"]))  # fmt: skip
            item["status"] = status
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


async def response_events(body: ResponsesRequest, rid: str, created: float, run, first: GenerateChunk | None,
                          plan: tools.ToolPlan | None) -> AsyncIterator[str]:  # fmt: skip
    """The SSE body of a streamed response. ``run`` is the chat service's run (serving.py), started."""
    event = _Events()
    response = echo(body, rid, created)
    yield event("response.created", response=response)
    yield event("response.in_progress", response=response)
    output = _Output(event)
    reader = tools.EnvelopeReader(plan) if plan is not None else None
    finish_reason = "stop"
    chunks = run.chunks(first)
    try:
        async for chunk in chunks:
            pieces = reader.feed(chunk.text) if reader is not None else [tools.ContentDelta(chunk.text)]
            for piece in pieces:
                if isinstance(piece, tools.ContentDelta):
                    for e in output.text(piece.text):
                        yield e
                elif isinstance(piece, tools.CallStarted):
                    for e in output.call(piece.id, piece.name):
                        yield e
                else:
                    for e in output.arguments(piece.text):
                        yield e
            if chunk.finish_reason is not None:
                finish_reason = chunk.finish_reason if chunk.finish_reason in ("stop", "length") else "stop"
        if reader is not None:
            finish_reason = reader.finish(finish_reason).finish_reason
        if not output.items and (plan is None or plan.mode == "auto"):  # an empty answer is still a message
            for e in output.text(""):
                yield e
        for e in output.close("incomplete" if finish_reason == "length" else "completed"):
            yield e
        response = finish({**response, "output": output.items}, finish_reason)
        u = run.usage()
        response["usage"] = usage(u.prompt_tokens, u.completion_tokens)
        yield event("response.incomplete" if response["status"] == "incomplete" else "response.completed",
                    response=response)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - becomes an error event; the stream then ends
        error = to_api_error(e)
        yield event("error", code=error.code, message=error.message, param=error.param)
    finally:
        await chunks.aclose()
