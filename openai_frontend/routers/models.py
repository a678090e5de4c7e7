"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter

from openai_frontend.dependencies import RegistryDep
from openai_frontend.errors import ErrorResponse
from openai_frontend.schemas import Model, ModelList

router = APIRouter()
_ERRORS = {401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def _model(registry, name: str) -> Model:
    return Model(id=name, root=name, aliases=registry.aliases(name))


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS, summary="List the served models")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[_model(registry, name) for name in await registry.served()])


@router.get("/v1/models/{model_id:path}", response_model=Model, responses={404: {"model": ErrorResponse}, **_ERRORS},
            summary="One served model (Triton name or alias)")  # fmt: skip
async def retrieve_model(model_id: str, registry: RegistryDep) -> Model:
    target = await registry.resolve(model_id)
    return Model(id=model_id, root=target, aliases=registry.aliases(target))
