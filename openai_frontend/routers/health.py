"""GET /health (alive), /health/ready (Triton and the models ready), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openai_frontend.backend import BackendError
from openai_frontend.dependencies import RegistryDep, SettingsDep

router = APIRouter()


@router.get("/health", summary="The frontend is alive")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/health/ready", summary="Triton and the served models are ready",
            responses={503: {"description": "Triton or a configured model is not ready"}})  # fmt: skip
async def ready(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    backend = request.app.state.backend
    if not await backend.server_ready():
        return JSONResponse({"status": "unavailable", "reason": "Triton is not ready"}, status_code=503)
    try:
        served = await registry.served()
    except BackendError as e:
        return JSONResponse({"status": "unavailable", "reason": e.message}, status_code=503)
    missing = [m for m in settings.models if m not in served]
    if missing or not served:
        reason = f"models not ready: {', '.join(missing)}" if missing else "no model is ready"
        return JSONResponse({"status": "unavailable", "reason": reason, "models": served}, status_code=503)
    body = {"status": "ready", "models": served}
    if hasattr(backend, "status"):  # several Triton servers (balancer.py): each one's state and load
        body["triton"] = backend.status()
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})  # fmt: skip
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
