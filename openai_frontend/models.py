"""Which models are served, and under which names: Triton's model names plus aliases."""

from __future__ import annotations

import time

from openai_frontend.backend import BackendError, InferenceBackend
from openai_frontend.errors import APIError
from openai_frontend.settings import DEFAULT_ALIASES, Settings

_CACHE_SECONDS = 2.0


class ModelRegistry:
    def __init__(self, settings: Settings, backend: InferenceBackend):
        self.settings = settings
        self.backend = backend
        self._ready: list[str] = []
        self._checked = float("-inf")

    def aliases(self, name: str) -> list[str]:
        return [alias for alias, target in DEFAULT_ALIASES.items() if target == name]

    async def served(self) -> list[str]:
        """The Triton names of the models served now (configured ones, or whatever Triton has ready).
        Raises BackendError(UNAVAILABLE) when Triton cannot be reached."""
        now = time.monotonic()
        if now - self._checked > _CACHE_SECONDS:
            ready = await self.backend.ready_models()
            self._ready = [m for m in ready if not self.settings.models or m in self.settings.models]
            self._checked = now
        return self._ready

    async def resolve(self, name: str) -> str:
        """A client's model name -> the Triton model name. 404 for names we do not know; 503 for a known
        model that is not ready (or Triton being down)."""
        target = DEFAULT_ALIASES.get(name, name)
        try:
            served = await self.served()
        except BackendError:
            if target in self.settings.models or target in DEFAULT_ALIASES.values():
                raise
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found") from None
        if target in served:
            return target
        if target in self.settings.models:
            raise APIError(503, f"the model '{name}' is not ready", code="model_not_ready")
        known = ", ".join(served) or "none"
        raise APIError(404, f"the model '{name}' does not exist (served: {known})", param="model",
                       code="model_not_found")  # fmt: skip
