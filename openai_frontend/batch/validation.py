"""Checks of a batch input file (OpenAI's JSONL: one ``{"custom_id", "method", "url", "body"}`` object a line)
and of the ids that arrive in URLs. A malformed file is refused as a whole, with the line that is wrong; what
a line's ``body`` says is checked when the line runs (a bad body fails that line only, as OpenAI does)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, StringConstraints

from openai_frontend.errors import APIError, invalid

# Endpoints a batch may target: the two the frontend serves (a line runs through that endpoint's own code).
CHAT_ENDPOINT = "/v1/chat/completions"
RESPONSES_ENDPOINT = "/v1/responses"
OPENAI_ENDPOINTS = (CHAT_ENDPOINT, RESPONSES_ENDPOINT, "/v1/embeddings", "/v1/completions", "/v1/moderations",
                    "/v1/images/generations", "/v1/images/edits")  # fmt: skip
SUPPORTED_ENDPOINTS = (CHAT_ENDPOINT, RESPONSES_ENDPOINT)
MAX_CUSTOM_ID = 512
MAX_LINE_BYTES = 64 * 2**20

# A batch's metadata, OpenAI's rule in its OpenAPI form: at most 16 pairs, keys up to 64 characters, string values
# up to 512 (checked when the request is parsed, and published in /openapi.json).
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(
    max_length=512)]], Field(max_length=16)]

_FILE_ID = re.compile(r"file-[0-9a-f]{24}")
_BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")


def file_not_found(file_id: str, param: str = "file_id") -> APIError:
    """The one answer for a file that is not there for this caller: unknown, deleted, expired or another tenant's
    (the same body for all, so that it says nothing of other tenants' files)."""
    return APIError(404, f"no such file: {file_id}", param=param, code="file_not_found")


def check_file_id(value: str, param: str = "file_id") -> str:
    """Ids become disk paths: only our own exact shape is accepted (no traversal, no odd characters)."""
    if not isinstance(value, str) or not _FILE_ID.fullmatch(value):
        raise APIError(404, f"no such file: {value!r}"[:200], param=param, code="file_not_found")
    return value


def check_batch_id(value: str) -> str:
    if not _BATCH_ID.fullmatch(value):
        raise APIError(404, f"no such batch: {value!r}"[:200], param="batch_id", code="batch_not_found")
    return value


def check_endpoint(endpoint: str) -> None:
    if endpoint in SUPPORTED_ENDPOINTS:
        return
    known = " (an OpenAI endpoint this server does not serve)" if endpoint in OPENAI_ENDPOINTS else ""
    raise invalid(f"endpoint {endpoint!r}{known} is not supported; use '/v1/chat/completions' or '/v1/responses'"
                  [:300], "endpoint", code="unsupported_endpoint")  # fmt: skip


def clean_filename(name: str | None) -> str:
    """The name shown back to clients: the last path component, printable, at most 255 characters.
    It is never used as a path on disk."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:255]
    return name or "upload.jsonl"


@dataclass
class Line:
    number: int  # 1-based line number in the file
    custom_id: str
    offset: int  # bytes from the start of the file
    length: int


@dataclass
class Scan:
    url: str
    model: str | None
    lines: list[Line]


def _bad(message: str, number: int, code: str = "invalid_batch_file") -> APIError:
    return invalid(f"line {number}: {message}", "file", code=code)


def scan(path: Path, max_lines: int) -> Scan:
    """Every line: a JSON object with a unique non-empty ``custom_id``, ``method`` POST, the same ``url`` as the
    other lines and an object ``body``. Blank lines are skipped. Raises APIError(400) naming the line."""
    lines: list[Line] = []
    seen: set[str] = set()
    url: str | None = None
    model: str | None = None
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                raise _bad(f"longer than {MAX_LINE_BYTES} bytes", number)
            if len(lines) >= max_lines:
                raise invalid(f"more than {max_lines} requests in one file (the server's limit)", "file",
                              code="too_many_requests_in_file")  # fmt: skip
            try:
                item = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                raise _bad("not valid JSON (the file must be JSONL: one JSON object per line)", number) from None
            if not isinstance(item, dict):
                raise _bad("not a JSON object", number)
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise _bad("'custom_id' must be a non-empty string", number)
            if len(custom_id) > MAX_CUSTOM_ID:
                raise _bad(f"'custom_id' is longer than {MAX_CUSTOM_ID} characters", number)
            if custom_id in seen:
                raise _bad(f"duplicate custom_id {custom_id!r}"[:300], number, code="duplicate_custom_id")
            seen.add(custom_id)
            if item.get("method") != "POST":
                raise _bad("'method' must be \"POST\"", number)
            line_url = item.get("url")
            if not isinstance(line_url, str) or not line_url:
                raise _bad("'url' must be the endpoint, e.g. \"/v1/chat/completions\"", number)
            if url is None:
                url = line_url
            elif line_url != url:
                raise _bad(f"'url' {line_url!r} differs from the first line's {url!r}"[:300], number)
            body = item.get("body")
            if not isinstance(body, dict):
                raise _bad("'body' must be a JSON object (the request)", number)
            if model is None and isinstance(body.get("model"), str):
                model = body["model"][:200]
            extra = set(item) - {"custom_id", "method", "url", "body"}
            if extra:
                raise _bad(f"unknown field(s) {sorted(extra)}"[:300], number)
            lines.append(Line(number, custom_id, start, len(raw)))
    if not lines:
        raise invalid("the file has no requests", "file", code="empty_file")
    return Scan(url=url or "", model=model, lines=lines)
