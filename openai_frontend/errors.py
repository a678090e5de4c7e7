"""The one error envelope, ``{"error": {"message", "type", "param", "code"}}``, and the one place that maps
failures to it: validation problems, backend errors, and anything unexpected (logged, never shown)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_frontend.backend import BackendError

logger = logging.getLogger(__name__)

# Backend error kinds -> (HTTP status, OpenAI error type).
_BACKEND_STATUS = {
    BackendError.INVALID: (400, "invalid_request_error"),
    BackendError.NOT_FOUND: (404, "not_found_error"),
    BackendError.QUEUE_FULL: (429, "rate_limit_error"),
    BackendError.UNAVAILABLE: (503, "service_unavailable_error"),
    BackendError.TIMEOUT: (504, "timeout_error"),
    BackendError.INTERNAL: (500, "internal_error"),
    BackendError.CANCELLED: (499, "cancelled"),
}
# Seconds a 429 asks the client to wait (Retry-After): slots free as requests finish, typically within seconds.
RETRY_AFTER_SECONDS = 1
_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """A failure the client should see, with its HTTP status (and headers: every 429 says when to retry)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if status == 429:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info()).model_dump(), status_code=self.status,
                            headers=self.headers or None)  # fmt: skip


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_message(limit: int, prompt_tokens: int, completion_tokens: int) -> str:
    """OpenAI's wording, which clients match on (LiteLLM's ContextWindowExceededError, for one)."""
    return (f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} in the "
            "completion). Please reduce the length of the messages or completion.")  # fmt: skip


def from_backend(error: BackendError) -> APIError:
    status, kind = _BACKEND_STATUS[error.kind]
    code = error.code or (None if error.kind == BackendError.INVALID else error.kind)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return APIError(status, error.message, type=kind, param=error.param, code=code, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """Any exception -> what the client sees. Unexpected ones are logged with their trace, shown as 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackendError):
        return from_backend(exc)
    logger.exception("unexpected error", exc_info=exc)
    return APIError(500, "internal server error", type="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    part = _unknown_content_part(errors)
    if part is not None:
        return part
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "extra_forbidden":
        message = "unrecognized request argument"
    return (f"{param}: {message}" if param else message), param


def _unknown_content_part(errors: list[dict]) -> tuple[str, str] | None:
    """A content part of a type we don't take (``input_audio``, a typo): pydantic reports the content union's
    first branch ("content.str: Input should be a valid string") before the part's unknown tag; name the type
    and the ones we take instead."""
    from openai_frontend.schemas import CONTENT_PART_TYPES

    for error in errors:
        if error.get("type") != "union_tag_invalid":
            continue
        # loc: body, messages, 0, content, <the union branch, "list[tagged-union[...]]">, 1
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and not str(p).startswith("list[")]
        if "content" not in loc:
            continue
        part = ".".join(loc[: loc.index("content") + 2])  # messages.0.content.1
        tag = (error.get("ctx") or {}).get("tag")
        return (f"{part}: content part type {tag!r} is not supported; this server takes "
                f"{', '.join(CONTENT_PART_TYPES)}", f"{part}.type")  # fmt: skip
    return None


async def _empty_form_field(request: Request, exc: RequestValidationError) -> str | None:
    """The name of the first "missing" form field the request did send, empty (multipart and urlencoded forms)."""
    first = next(iter(exc.errors()), None)
    loc = first.get("loc", ()) if first else ()
    if first is None or first.get("type") != "missing" or len(loc) != 2 or loc[0] != "body":
        return None
    if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                               "application/x-www-form-urlencoded")):  # fmt: skip
        return None
    form = await request.form()  # parsed already by FastAPI: cached
    return str(loc[1]) if form.get(str(loc[1])) == "" else None


def _allowed_methods(request: Request) -> list[str]:
    """Every method the app serves at the request's path, sorted: from its OpenAPI document (the routers are
    nested, and each route knows only its own methods); HEAD wherever GET is (Starlette answers it)."""
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {m.upper() for m in item if m.lower() in _HTTP_METHODS}
    return sorted(methods | ({"HEAD"} if "GET" in methods else set()))


_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(BackendError)
    async def _backend_error(request: Request, exc: BackendError) -> JSONResponse:
        return from_backend(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        empty = await _empty_form_field(request, exc)
        if empty is not None:  # FastAPI reports a form field sent empty as missing: say what it is
            message, param = f"{empty} is empty", empty
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            # Starlette's Allow lists the methods of the first route that matched the path; a path served by
            # several routes (GET and POST /v1/files) has them all (RFC 9110: the target resource's methods).
            allowed = _allowed_methods(request)
            if allowed:
                headers = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
                headers["Allow"] = ", ".join(allowed)
        return APIError(exc.status_code, message, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()
