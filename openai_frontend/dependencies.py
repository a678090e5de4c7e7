"""FastAPI dependencies: the app's shared objects and API-key checking. All ``async``: FastAPI runs plain
functions in a thread pool, which costs about a quarter of a millisecond each."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from openai_frontend.errors import APIError
from openai_frontend.models import ModelRegistry
from openai_frontend.serving import ChatService
from openai_frontend.settings import Settings
from openai_frontend.tenants import ANONYMOUS, Principal


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ChatDep = Annotated[ChatService, Depends(get_chat)]


async def authenticate(request: Request) -> Principal:
    """The caller, from "Authorization: Bearer <key>" when keys are configured (a 401 otherwise). FastAPI runs a
    dependency once per request, so routes that name ``PrincipalDep`` reuse the router's check."""
    keys = request.app.state.keys
    if not keys.enabled:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    principal = keys.lookup(key)
    if principal is None:
        raise APIError(401, "incorrect API key", code="invalid_api_key")
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]
