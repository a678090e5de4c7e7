"""Reading the tool-call envelope (see :mod:`openai_frontend.tools`) as it streams: content deltas, tool calls
with their ids, names and arguments, and the finished answer with the finish reason to report."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai_frontend.tools import ToolPlan

_ALPHABET = string.ascii_letters + string.digits


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStarted:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class Outcome:
    """The whole answer: ``content`` (None when the answer is tool calls), the calls, whether the envelope
    was complete, and the finish reason to report."""

    content: str | None
    calls: list[ToolCall]
    complete: bool
    finish_reason: str


class _Scanner:
    """A character-level JSON scanner that knows the path (keys and indices) of the value it is in.

    Records where each value starts (``starts[path]``) and, once it ends, where (``ends[path]``), as offsets
    into ``text``; :meth:`compact` gives a stretch of the text without the whitespace between JSON tokens
    (the grammar lets the model put up to 16 whitespace characters between any two). Only the envelope's
    shape matters here: the grammar guarantees the text is JSON."""

    def __init__(self) -> None:
        self.text = ""
        self._blank: list[bool] = []  # per character: whitespace between tokens (not inside a string)
        self.stack: list[list[Any]] = []  # [kind "o"/"a", key or index, expecting a key]
        self.starts: dict[tuple, int] = {}
        self.ends: dict[tuple, int] = {}
        self.complete = False
        self._in_string = self._escape = self._key = False
        self._string_start = 0
        self._scalar: int | None = None

    def path(self) -> tuple:
        return tuple(frame[1] for frame in self.stack)

    def feed(self, piece: str) -> None:
        base = len(self.text)
        self.text += piece
        for offset, c in enumerate(piece):
            self._blank.append(not self._in_string and c in " \t\n\r")
            self._char(base + offset, c)

    def compact(self, start: int, end: int) -> str:
        return "".join(c for c, blank in zip(self.text[start:end], self._blank[start:end], strict=True) if not blank)

    def _begin(self, at: int) -> None:
        self.starts[self.path()] = at

    def _end(self, at: int) -> None:
        self.ends[self.path()] = at
        if not self.stack:
            self.complete = True

    def _char(self, p: int, c: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if self._key:
                    self.stack[-1][1] = json.loads(self.text[self._string_start:p + 1], strict=False)
                else:
                    self._end(p + 1)
            return
        if self._scalar is not None and c in " \t\n\r,]}":
            self._scalar = None
            self._end(p)
        if c in " \t\n\r":
            return
        top = self.stack[-1] if self.stack else None
        if c == '"':
            self._in_string, self._string_start = True, p
            self._key = top is not None and top[0] == "o" and top[2]
            if not self._key:
                self._begin(p)
        elif c in "{[":
            self._begin(p)
            self.stack.append(["o", None, True] if c == "{" else ["a", 0, False])
        elif c == ":" and top is not None:
            top[2] = False
        elif c == "," and top is not None:
            if top[0] == "o":
                top[1], top[2] = None, True
            else:
                top[1] += 1
        elif c in "}]":
            self.stack.pop()
            self._end(p + 1)
        elif self._scalar is None:
            self._scalar = p
            self._begin(p)


def _decodable(raw: str) -> int:
    """How much of a JSON string body can be decoded now (no escape, or surrogate pair, cut in half)."""
    i = 0
    while i < len(raw):
        if raw[i] != "\\":
            i += 1
            continue
        if i + 1 >= len(raw):
            break
        if raw[i + 1] != "u":
            i += 2
            continue
        if i + 6 > len(raw):
            break
        try:
            high = 0xD800 <= int(raw[i + 2:i + 6], 16) < 0xDC00
        except ValueError:
            high = False
        if high:
            if i + 12 > len(raw):
                break
            i += 12
        else:
            i += 6
    return i


class EnvelopeReader:
    """Reads one choice's envelope as it streams: :meth:`feed` returns the new content and tool-call events,
    :meth:`finish` the whole answer."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._scan = _Scanner()
        self._content_at = 0  # offset up to which the content value has been passed on
        self._content = ""
        self._calls: list[ToolCall] = []
        self._args_at: list[int] = []

    def feed(self, piece: str) -> list[ContentDelta | CallStarted | ArgumentsDelta]:
        if not piece:
            return []
        scan = self._scan
        scan.feed(piece)
        events: list[ContentDelta | CallStarted | ArgumentsDelta] = []
        content = self._content_piece()
        if content:
            self._content += content
            events.append(ContentDelta(content))
        while ("tool_calls", len(self._calls), "name") in scan.ends:
            index = len(self._calls)
            path = ("tool_calls", index, "name")
            name = json.loads(scan.text[scan.starts[path]:scan.ends[path]], strict=False)
            self._calls.append(ToolCall(call_id(), name, ""))
            self._args_at.append(-1)
            events.append(CallStarted(index, self._calls[-1].id, name))
        for index, call in enumerate(self._calls):
            path = ("tool_calls", index, "arguments")
            start = scan.starts.get(path)
            if start is None:
                continue
            end = scan.ends.get(path, len(scan.text))
            begin = max(self._args_at[index], start)
            piece = scan.compact(begin, end) if end > begin else ""
            if piece:
                call.arguments += piece
                events.append(ArgumentsDelta(index, piece))
            self._args_at[index] = end
        return events

    def _content_piece(self) -> str:
        scan = self._scan
        start = scan.starts.get(("content",))
        if start is None:
            return ""
        end = scan.ends.get(("content",))
        if self.plan.structured_content:  # the JSON value itself
            begin = max(self._content_at, start)
            stop = len(scan.text) if end is None else end
            self._content_at = stop
            return scan.compact(begin, stop)
        begin = max(self._content_at, start + 1)  # inside the string's quotes
        stop = len(scan.text) if end is None else end - 1
        raw = scan.text[begin:stop]
        usable = len(raw) if end is not None else _decodable(raw)
        self._content_at = begin + usable
        return json.loads('"' + raw[:usable] + '"', strict=False) if usable else ""

    @property
    def kind(self) -> str | None:
        """"content" or "tool_calls" once the envelope's first key is known."""
        if ("content",) in self._scan.starts:
            return "content"
        if ("tool_calls",) in self._scan.starts:
            return "tool_calls"
        return None

    def finish(self, finish_reason: str) -> Outcome:
        """The answer so far and the finish reason to report: "tool_calls" when the envelope is complete
        and holds calls (each call's arguments then parse as JSON), else the engine's reason."""
        complete = self._scan.complete
        if self.kind == "tool_calls" or (self.kind is None and self.plan.mode != "auto"):  # calls are all it can be
            reason = finish_reason
            if complete and finish_reason == "stop":
                for call in self._calls:
                    json.loads(call.arguments)  # the grammar guarantees it; a failure here is a server bug
                reason = "tool_calls"
            return Outcome(None, list(self._calls), complete, reason)
        return Outcome(self._content, [], complete, finish_reason)
