"""Which models are served, and under which names: Triton's model names plus aliases, and the LoRA adapters
of those models (each asked with a control "list" request, minicpmv_triton/backend.py), selected by name as
vLLM's ``model`` selects them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from openai_frontend.backend import BackendError, InferenceBackend, LoRAAdapter, LoRAStatus
from openai_frontend.errors import APIError
from openai_frontend.settings import DEFAULT_ALIASES, Settings

logger = logging.getLogger(__name__)
_CACHE_SECONDS = 2.0
# A name not among the cached adapters asks again once the list is this old (an adapter another frontend just loaded).
_MISS_SECONDS = 0.2


@dataclass(frozen=True)
class Target:
    """What a client's model name selects: a Triton model, and on it a LoRA adapter or none."""

    model: str
    adapter: str | None = None


class ModelRegistry:
    def __init__(self, settings: Settings, backend: InferenceBackend):
        self.settings = settings
        self.backend = backend
        self._ready: list[str] = []
        self._checked = float("-inf")
        self._lora: dict[str, LoRAStatus] = {}
        self._lora_checked = float("-inf")
        self._lora_lock = asyncio.Lock()
        self._shadowed: set[str] = set()

    def aliases(self, name: str) -> list[str]:
        return [alias for alias, target in DEFAULT_ALIASES.items() if target == name]

    def is_model_name(self, name: str) -> bool:
        """A name that selects a model (a Triton name, configured or known, or an alias): never an adapter's."""
        return name in DEFAULT_ALIASES or name in DEFAULT_ALIASES.values() or name in self.settings.models \
            or name in self._ready  # fmt: skip

    async def served(self) -> list[str]:
        """The Triton names of the models served now (configured ones, or whatever Triton has ready).
        Raises BackendError(UNAVAILABLE) when Triton cannot be reached."""
        now = time.monotonic()
        if now - self._checked > _CACHE_SECONDS:
            ready = await self.backend.ready_models()
            self._ready = [m for m in ready if not self.settings.models or m in self.settings.models]
            self._checked = now
        return self._ready

    async def lora_status(self) -> dict[str, LoRAStatus]:
        """Each served model's adapters (cached like :meth:`served`); a model that can't say has none."""
        served = await self.served()
        async with self._lora_lock:  # one round of control requests at a time, however many clients ask
            now = time.monotonic()
            if now - self._lora_checked > _CACHE_SECONDS or set(self._lora) != set(served):
                answers = await asyncio.gather(*(self.backend.lora_status(m) for m in served), return_exceptions=True)
                self._lora = {}
                for model, answer in zip(served, answers, strict=True):
                    if isinstance(answer, BaseException):
                        if not isinstance(answer, Exception):
                            raise answer
                        logger.debug("no LoRA adapters of %s: %s", model, answer)
                        answer = LoRAStatus()
                    self._lora[model] = answer
                self._lora_checked = now
            return self._lora

    async def adapters(self) -> dict[str, tuple[str, LoRAAdapter]]:
        """Adapter name -> (its base model, the adapter). A name that is also a model's or an alias selects the
        model (the adapter is not listed); one on several models selects the first served model's."""
        found: dict[str, tuple[str, LoRAAdapter]] = {}
        for model, status in (await self.lora_status()).items():
            for adapter in status.adapters:
                if self.is_model_name(adapter.name):
                    if adapter.name not in self._shadowed:
                        self._shadowed.add(adapter.name)
                        logger.warning("LoRA adapter %r of %s has a model's name; the name selects the model",
                                       adapter.name, model)  # fmt: skip
                    continue
                found.setdefault(adapter.name, (model, adapter))
        return found

    def invalidate(self) -> None:
        """Forget the cached adapters (after a load or an unload through this frontend)."""
        self._lora_checked = float("-inf")

    async def resolve(self, name: str) -> Target:
        """A client's model name -> the Triton model (and adapter) it selects. 404 for names we do not know; 503
        for a known model that is not ready (or Triton being down)."""
        target = DEFAULT_ALIASES.get(name, name)
        try:
            served = await self.served()
        except BackendError:
            if target in self.settings.models or target in DEFAULT_ALIASES.values():
                raise
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found") from None
        if target in served:
            return Target(target)
        adapters = {}
        if not self.is_model_name(name):
            adapters = await self.adapters()
            if name not in adapters and time.monotonic() - self._lora_checked > _MISS_SECONDS:
                self.invalidate()
                adapters = await self.adapters()
        if name in adapters:
            return Target(adapters[name][0], name)
        if target in self.settings.models:
            raise APIError(503, f"the model '{name}' is not ready", code="model_not_ready")
        known = ", ".join([*served, *adapters]) or "none"
        raise APIError(404, f"the model '{name}' does not exist (served: {known})", param="model",
                       code="model_not_found")  # fmt: skip
