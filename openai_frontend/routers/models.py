"""GET /v1/models and /v1/models/{id}: the served models and their LoRA adapters (each with its ``parent``)."""

from __future__ import annotations

from fastapi import APIRouter

from openai_frontend.dependencies import RegistryDep
from openai_frontend.errors import ErrorResponse
from openai_frontend.schemas import Model, ModelList

router = APIRouter()
_ERRORS = {401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS, summary="List the served models and adapters")
async def list_models(registry: RegistryDep) -> ModelList:
    models = [Model(id=name, root=name, aliases=registry.aliases(name)) for name in await registry.served()]
    adapters = [Model(id=name, root=adapter.path or name, parent=model)
                for name, (model, adapter) in (await registry.adapters()).items()]  # fmt: skip
    return ModelList(data=models + adapters)


@router.get("/v1/models/{model_id:path}", response_model=Model, responses={404: {"model": ErrorResponse}, **_ERRORS},
            summary="One served model (Triton name or alias) or LoRA adapter")  # fmt: skip
async def retrieve_model(model_id: str, registry: RegistryDep) -> Model:
    target = await registry.resolve(model_id)
    if target.adapter is not None:
        model, adapter = (await registry.adapters())[target.adapter]
        return Model(id=model_id, root=adapter.path or model_id, parent=model)
    return Model(id=model_id, root=target.model, aliases=registry.aliases(target.model))
