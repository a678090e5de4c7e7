"""The FastAPI application: settings, the backend (Triton unless a test passes another), routers, errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import httpx
from fastapi import APIRouter, Depends, FastAPI

from openai_frontend import __version__, errors, web
from openai_frontend.backend import InferenceBackend
from openai_frontend.balancer import REASONS, balanced
from openai_frontend.batch.runner import start_batches, stop_batches
from openai_frontend.dependencies import authenticate
from openai_frontend.load import LoadMonitor
from openai_frontend.metrics import Metrics, ProtocolCollector
from openai_frontend.models import ModelRegistry
from openai_frontend.routers import batches, chat, files, health, lora, models, responses
from openai_frontend.serving import ChatService
from openai_frontend.settings import Settings
from openai_frontend.tenants import KeyTable

logger = logging.getLogger(__name__)


def _triton(settings: Settings) -> InferenceBackend:
    from openai_frontend.triton_client import TritonBackend  # the only tritonclient user

    # One server at an IP address: TritonBackend itself; several, or DNS names: BalancedBackend (balancer.py).
    return balanced(settings.triton_endpoints(), TritonBackend, probe_interval=settings.triton_probe_interval,
                    discovery_interval=settings.triton_discovery_interval, affinity=settings.balancer_affinity,
                    load_factor=settings.balancer_load_factor)  # fmt: skip


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, whether Content-Length says so or the stream does."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = errors.APIError(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                                    code="request_too_large")  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)  # the HTTP server holds the body to its Content-Length
        # No Content-Length (chunked upload): read the body here, counting, then replay it to the app.
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None,
               backend_factory: Callable[[Settings], InferenceBackend] = _triton) -> FastAPI:  # fmt: skip
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        backend = backend_factory(settings)  # inside the event loop: gRPC and aiohttp bind to it
        metrics = Metrics()
        if hasattr(backend, "on_choice"):  # several Triton servers or DNS names (balancer.py)
            for reason in REASONS:
                metrics.balancer_choices.labels(reason=reason)
            backend.on_choice = lambda reason: metrics.balancer_choices.labels(reason=reason).inc()
        app.state.settings = settings
        app.state.backend = backend
        app.state.metrics = metrics
        app.state.registry = ModelRegistry(settings, backend)
        # The engines' load: protocol metrics for gateways, the derived in-flight limit, Retry-After (load.py).
        app.state.load = LoadMonitor(backend, app.state.registry.served, settings.engine_stats_interval)
        metrics.registry.register(ProtocolCollector(app.state.load.current))
        app.state.load.start()
        app.state.chat = ChatService(settings, backend, metrics, app.state.load)
        app.state.http = httpx.AsyncClient(follow_redirects=False) if settings.allow_remote_images else None
        start_batches(app.state)  # the Batch API's store and runner (openai_frontend/batch/)
        logger.info("frontend ready; Triton at grpc=%s http=%s", settings.triton_grpc_url, settings.triton_http_url)
        try:
            yield
        finally:
            await stop_batches(app.state)
            await app.state.load.stop()
            if app.state.http is not None:
                await app.state.http.aclose()
            await backend.close()

    app = FastAPI(
        title="MiniCPM-V 2.6 OpenAI-compatible API",
        version=__version__,
        description="OpenAI chat completions (text, images, streaming, JSON mode) for MiniCPM-V 2.6 on Triton. "
        "Every error answers {\"error\": {\"message\", \"type\", \"param\", \"code\"}}.",
        lifespan=lifespan,
        docs_url=None,  # web.install_docs serves /docs with local assets; ReDoc would need a CDN
        redoc_url=None,
    )
    app.state.keys = KeyTable(settings.api_keys, settings.admin_api_keys)
    errors.install(app)
    web.install_docs(app)
    v1 = APIRouter(dependencies=[Depends(authenticate)])
    v1.include_router(chat.router)
    v1.include_router(responses.router)
    v1.include_router(models.router)
    v1.include_router(files.router)
    v1.include_router(batches.router)
    if settings.enable_lora_runtime_updates:  # otherwise absent: 404, as vLLM answers without its setting
        v1.include_router(lora.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    web.add_http_middleware(app, settings)  # CORS and x-request-id, outermost
    return app
