"""`/health` without a shard round trip while the server is busy.

A Prefill or Decode that every shard answered within the last `RECENT_STEP_S` seconds proves more than the Health
RPC does (the shards are up and generating), so a probe answers from it. Otherwise (idle, or the latest step
failed) the probe asks the shards, as before. Probes during load then cost nothing, and a probe of an idle or
failing server still reaches every shard.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

RECENT_STEP_S = 5.0


class Health:
    def __init__(
        self,
        ask_shards: Callable[[], Awaitable[None]],
        recent_s: float = RECENT_STEP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ask_shards = ask_shards
        self._recent_s = recent_s
        self._clock = clock
        self._succeeded_at: float | None = None  # when the latest step succeeded; None if it failed or none ran

    def step(self, succeeded: bool) -> None:
        """Record the outcome of a batching step (router/batching.py)."""
        self._succeeded_at = self._clock() if succeeded else None

    async def check(self) -> None:
        """Return when healthy; raise the shards' error otherwise."""
        at = self._succeeded_at
        if at is not None and self._clock() - at <= self._recent_s:
            return
        await self._ask_shards()
