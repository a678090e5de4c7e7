"""HTTP plumbing around the API: the ``x-request-id`` header, CORS, and /docs served without internet."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from openai_frontend import errors
from openai_frontend.settings import Settings

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed when it is a plain token (OpenAI's and proxies' ids are); anything else is replaced.
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
DOCS_ASSETS = "/docs/assets"


class RequestId:
    """ASGI middleware: every response carries ``x-request-id``, the client's own if it sent a usable one, else
    a new ``req_<32 hex>``; the id is also in ``scope["state"]["request_id"]`` for the handlers and the logs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER)
        request_id = given if given is not None and _CLIENT_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Unexpected errors would otherwise become Starlette's 500 outside this middleware, without the id.
            if started:
                raise
            await errors.to_api_error(exc).response()(scope, receive, send_with_id)


def add_http_middleware(app: FastAPI, settings: Settings) -> None:
    """CORS (only when origins are configured) and the request id, outermost: every response gets both, errors
    of the inner middleware (413) included."""
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "retry-after"],
                           allow_credentials=settings.cors_allow_credentials)  # fmt: skip
    app.add_middleware(RequestId)


def install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI with its scripts and styles served by us (the ``swagger-ui-bundle-v2`` package), so
    the page works offline. Without the package, FastAPI's default page (scripts from a CDN) is used."""
    try:
        import swagger_ui_bundle
    except ImportError:
        logger.warning("swagger-ui-bundle-v2 is not installed: /docs loads Swagger UI from a CDN")
        app.add_api_route("/docs", _cdn_docs(app), include_in_schema=False)
        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")  # fmt: skip

    app.add_api_route("/docs", docs, include_in_schema=False)


def _cdn_docs(app: FastAPI):
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs")

    return docs
