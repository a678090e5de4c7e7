"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's API), mounted only when the operator enables
them (``ENABLE_LORA_RUNTIME_UPDATES``; otherwise they answer 404 as routes that do not exist, as vLLM's do).

A load goes to every served model whose Triton engine loads adapters at runtime (its ``lora_dir`` is set), or to
the one ``model`` names; the path check (under the adapter directory) and the adapter's check are the engine's,
and its refusal comes back as a 400 with its message. With several Triton servers the balancer loads on each.
Adapters are the whole server's: where admin keys are configured (``ADMIN_API_KEYS``), only they load and unload
(403 for the other keys), so that one tenant cannot take away the adapter another uses."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from openai_frontend.backend import BackendError
from openai_frontend.dependencies import PrincipalDep, RegistryDep, SettingsDep
from openai_frontend.errors import APIError, ErrorResponse, invalid


async def _require_admin(principal: PrincipalDep, settings: SettingsDep) -> None:
    if settings.admin_api_keys and not principal.admin:
        raise APIError(403, "only admin keys load and unload LoRA adapters on this server", type="permission_error",
                       code="admin_key_required")  # fmt: skip


router = APIRouter(dependencies=[Depends(_require_admin)])
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
           404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}  # fmt: skip


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256, pattern=r"^\S+$")
    lora_path: str = Field(min_length=1, description="relative to the engine's lora_dir (or absolute, under it)")
    load_inplace: bool = Field(False, description="replace an adapter of that name (vLLM's)")
    # Ours: the base model to load it on (a name or alias); default every model that loads adapters at runtime.
    model: str | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(None, description="vLLM's; accepted, not used")


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS,
             summary="Load a LoRA adapter at runtime (vLLM's API)")  # fmt: skip
async def load_lora_adapter(body: LoadLoRAAdapterRequest, registry: RegistryDep) -> PlainTextResponse:
    name = body.lora_name
    if registry.is_model_name(name) or name in await registry.served():
        raise invalid(f"'{name}' is the name of a model; give the adapter another name", "lora_name")
    registry.invalidate()
    statuses = await registry.lora_status()
    if name in await registry.adapters() and not body.load_inplace:
        raise invalid(f"the LoRA adapter '{name}' has already been loaded; unload it first, or set load_inplace "
                      "to replace it", "lora_name")  # fmt: skip
    if body.model is not None:
        target = await registry.resolve(body.model)
        if target.adapter is not None:
            raise invalid(f"'{body.model}' is a LoRA adapter; name a base model", "model")
        models = [target.model]
    else:
        models = [model for model, status in statuses.items() if status.runtime_loading]
        if not models:
            raise invalid("no served model loads LoRA adapters at runtime: start them with a lora_dir "
                          "(serve.sh --lora-dir)", "lora_path")  # fmt: skip
    loaded: list[str] = []
    try:
        for model in models:
            await registry.backend.load_lora(model, name, body.lora_path)
            loaded.append(model)
    except BackendError:
        for model in loaded:  # all or nothing
            try:
                await registry.backend.unload_lora(model, name)
            except BackendError:
                pass
        raise
    finally:
        registry.invalidate()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS,
             summary="Unload a LoRA adapter (vLLM's API)")  # fmt: skip
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, registry: RegistryDep) -> PlainTextResponse:
    name = body.lora_name
    registry.invalidate()
    statuses = await registry.lora_status()
    models = [model for model, status in statuses.items() if any(a.name == name for a in status.adapters)]
    if not models:
        raise APIError(404, f"the LoRA adapter '{name}' does not exist", param="lora_name", code="model_not_found")
    try:
        for model in models:
            await registry.backend.unload_lora(model, name)
    finally:
        registry.invalidate()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
