"""The engines' load, polled from the servers behind this frontend (each served model's ``stats``,
minicpmv_triton/backend.py), every ``ENGINE_STATS_INTERVAL`` seconds. Three users:

* the model server protocol metrics on ``/metrics`` (metrics.ProtocolCollector), which an inference gateway's
  endpoint picker scrapes to choose a pod;
* admission: with ``MAX_CONCURRENT_REQUESTS`` unset, the frontend takes as many requests in flight as the servers
  accept (every model's running plus queued limit, summed; ``DEFAULT_LIMIT`` until they have answered once);
* ``Retry-After`` on a 429: the time the queues ahead take to drain at the rate requests have been finishing
  (``waiting / rate``, 1 to 60 s), so that refused clients come back when there is room, not all at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from openai_frontend.backend import BackendError, EngineStats, InferenceBackend

logger = logging.getLogger(__name__)
DEFAULT_LIMIT = 512  # requests in flight before the servers' limits are known
RETRY_AFTER_BOUNDS = (1, 60)
_SMOOTHING = 0.3  # weight of the newest drain-rate sample
_STALE_POLLS = 5  # figures older than this many intervals are not reported


class LoadMonitor:
    def __init__(self, backend: InferenceBackend, served, interval: float):
        """``served``: a coroutine function giving the Triton names of the models served now."""
        self.backend = backend
        self.served = served
        self.interval = interval
        self.stats: dict[str, EngineStats] = {}
        self.updated = 0.0  # time.time() of the last answer
        self._rates: dict[str, float] = {}  # finished requests per second, smoothed
        self._last: dict[str, tuple[float, int]] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the figures go stale; serving goes on
                logger.debug("engine stats poll failed", exc_info=True)
            await asyncio.sleep(self.interval)

    async def poll(self) -> None:
        try:
            models = await self.served()
        except BackendError:
            return
        answers = await asyncio.gather(*(self.backend.engine_stats(m) for m in models), return_exceptions=True)
        now = time.monotonic()
        fresh = {m: a for m, a in zip(models, answers, strict=True) if isinstance(a, EngineStats)}
        for model, stats in fresh.items():
            last = self._last.get(model)
            if last is not None and now > last[0] and stats.finished >= last[1]:
                rate = (stats.finished - last[1]) / (now - last[0])
                previous = self._rates.get(model)
                self._rates[model] = rate if previous is None else _SMOOTHING * rate + (1 - _SMOOTHING) * previous
            self._last[model] = (now, stats.finished)
        if fresh:
            self.stats = fresh
            self.updated = time.time()

    # ---------------------------------------------------------------- what the users read

    def current(self) -> EngineStats | None:
        """Every served model's figures together (what one pod reports), or None when they are stale."""
        if not self.stats or time.time() - self.updated > _STALE_POLLS * self.interval:
            return None
        return EngineStats.total(list(self.stats.values()))

    def capacity(self) -> int | None:
        """Requests the servers accept (running plus queued, every model); None until they have said."""
        stats = self.current()
        return stats.capacity if stats is not None and stats.capacity else None

    def retry_after(self, model: str | None = None) -> int:
        """Seconds until the queue ahead has drained at the recent rate: of ``model``, or of every model."""
        models = [model] if model in self.stats else list(self.stats)
        rates = [self._rates[m] for m in models if m in self._rates]
        waiting, rate = sum(self.stats[m].waiting for m in models), sum(rates)
        low, high = RETRY_AFTER_BOUNDS
        if rate <= 0:
            return high if waiting and rates else low  # nothing finishing: long; nothing known: soon
        return max(low, min(high, math.ceil(waiting / rate)))
