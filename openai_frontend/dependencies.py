"""FastAPI dependencies: the app's shared objects and API-key checking. All ``async``: FastAPI runs plain
functions in a thread pool, which costs about a quarter of a millisecond each."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from openai_frontend.errors import APIError
from openai_frontend.models import ModelRegistry
from openai_frontend.serving import ChatService
from openai_frontend.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ChatDep = Annotated[ChatService, Depends(get_chat)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in settings.api_keys):
        raise APIError(401, "incorrect API key", code="invalid_api_key")
