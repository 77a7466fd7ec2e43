"""Which adapters are active, and which queued request runs next (spec 4.1-4.5).

Differences from the reference, on purpose: every adapter's RPCs run in that adapter's own asyncio task, so a slow
or failing download never delays another adapter; an adapter still downloading does not block the pending adapters
behind it; and a failed adapter's waiting requests are failed at once (424 with the shard's message), not at the next
scheduling pass. RPCs of one adapter stay serialized by its lock, and a load/offload task always drives the shard
towards the adapter's *current* wanted state, so quick activate/deactivate flips cannot reorder them. A load waits
for the offloads decided before it, so the shards never hold more than `max_active_adapters` at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from lorax_server.adapters.access import credential_digest
from router.errors import GenerationError
from router.metrics import Metrics
from router.queue import AdapterQueues, Entry
from router.validation import BASE_MODEL_ID, AdapterSpec, ValidRequest

logger = logging.getLogger(__name__)

BASE_MODEL_KEY = (BASE_MODEL_ID,)


class AdapterClient(Protocol):
    async def download_adapter(self, spec: AdapterSpec) -> float: ...
    async def load_adapter(self, spec: AdapterSpec, index: int) -> None: ...
    async def offload_adapter(self, spec: AdapterSpec, index: int) -> None: ...


class AdapterStatus(enum.Enum):
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"  # on disk; not (or not yet, or no longer) usable by a batch
    READY = "ready"  # loaded on every shard and active: its requests may be batched


@dataclass(eq=False)
class Adapter:
    spec: AdapterSpec
    index: int
    status: AdapterStatus = AdapterStatus.DOWNLOADING
    cost: float | None = None  # fraction of the adapter memory budget, known once downloaded
    activated_at: float = 0.0
    tracked: bool = False  # in `pending` or `active`
    active: bool = False
    loaded: bool = False  # as far as the shards know
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Scheduler:
    def __init__(
        self,
        client: AdapterClient,
        max_active_adapters: int,
        adapter_cycle_time_s: float,
        on_change: Callable[[], None] = lambda: None,
        preloaded: Mapping[tuple, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if max_active_adapters < 1:
            raise ValueError("max_active_adapters must be >= 1")
        self.queues = AdapterQueues()
        self._client = client
        self._max_active = max_active_adapters
        self._cycle_s = adapter_cycle_time_s
        self._on_change = on_change
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._indices: dict[tuple, int] = {BASE_MODEL_KEY: 0, **(preloaded or {})}
        self._fixed = frozenset(self._indices)  # base model and preloaded adapters: one index for every caller
        self._adapters: dict[int, Adapter] = {}
        self._pending: deque[Adapter] = deque()
        self._active: deque[Adapter] = deque()
        self._budget = 1.0
        self._tasks: set[asyncio.Task] = set()
        self._offloads: set[asyncio.Task] = set()  # loads wait for these, so the shards never exceed the limit
        self._next_id = 0

    # ---- requests -------------------------------------------------------------------------------------------------

    def adapter_index(self, spec: AdapterSpec) -> int:
        """The stable index of an adapter key; new keys get the next free one and keep it forever.

        A request with an api_token gets the index of (adapter, digest of the token): its first request makes the
        shards check that token with the adapter's source (lorax_server/adapters/access.py) before it may share the
        weights another caller's token fetched, instead of riding on that caller's loaded adapter."""
        key = spec.key
        if spec.api_token and key not in self._fixed:
            key = (key, credential_digest(spec.api_token))
        return self._indices.setdefault(key, len(self._indices))

    def append(self, request: ValidRequest) -> Entry:
        """Queue a request; the first request of an unknown adapter starts its download."""
        index = self.adapter_index(request.adapter)
        adapter = self._adapters.get(index)
        if adapter is None:
            adapter = self._adapters[index] = Adapter(request.adapter, index)
            self._start_download(adapter)
        entry = Entry(id=self._next_id, request=request, adapter_index=index)
        self._next_id += 1
        self.queues.append(entry)
        if not adapter.tracked:
            adapter.tracked = True
            self._pending.append(adapter)
        self._on_change()
        return entry

    def push_front(self, entry: Entry) -> None:
        self.queues.push_front(entry)

    @property
    def queued(self) -> int:
        return len(self.queues)

    def next_entry(self) -> Entry | None:
        """Pop the oldest request among ready adapters, preferring recently activated ones (spec 4.5)."""
        while True:
            now = self._clock()
            oldest: tuple[int, Adapter] | None = None
            oldest_fresh: tuple[int, Adapter] | None = None
            for adapter in self._active:
                front = self.queues.front(adapter.index) if adapter.status is AdapterStatus.READY else None
                if front is None:
                    continue
                if oldest is None or front.id < oldest[0]:
                    oldest = (front.id, adapter)
                if now - adapter.activated_at < self._cycle_s and (oldest_fresh is None or front.id < oldest_fresh[0]):
                    oldest_fresh = (front.id, adapter)
            chosen = oldest_fresh or oldest
            if chosen is None:
                return None
            entry = self.queues.pop(chosen[1].index)
            if not entry.cancelled:
                return entry

    # ---- adapter activation ---------------------------------------------------------------------------------------

    def update_adapters(self, in_use: set[int]) -> None:
        """Exchange active adapters for pending ones (spec 4.4); `in_use` are the running batch's adapter indices.

        Unlike the reference, an active adapter gives way only when a pending one cannot otherwise be activated (no
        free active slot, or not enough of the memory budget): offloading an idle adapter while there is room would
        only make its next request load it again, stalling the shards' step loop (measured: 128 warm adapters
        reloaded on every burst cost the 128-adapter benchmark a fifth of its throughput)."""
        idle = [a for a in self._active if a.index not in in_use and self.queues.count(a.index) == 0]
        self._activate_pending()
        for adapter in idle:
            if not self._blocked():
                break
            self._deactivate(adapter)
            adapter.tracked = False
            self._activate_pending()
        if self._active and self._blocked():
            front = self._active[0]
            if front.index not in in_use and self._clock() - front.activated_at > self._cycle_s:
                self._deactivate(front)
                self._pending.append(front)
                self._activate_pending()

    def _activate_pending(self) -> None:
        """Activate pending adapters in order while slots and budget allow (one still downloading is skipped)."""
        for adapter in list(self._pending):
            if len(self._active) >= self._max_active:
                break
            if adapter.cost is None:
                continue  # still downloading: let the adapters behind it go first
            if adapter.cost > self._budget and self._active:
                break
            self._activate(adapter)

    def _blocked(self) -> bool:
        """Whether a pending adapter with a known cost waits for room: an active slot or memory budget."""
        first = next((a for a in self._pending if a.cost is not None), None)  # the next one activation would take
        if first is None:
            return False
        return len(self._active) >= self._max_active or (first.cost > self._budget and bool(self._active))

    def active_indices(self) -> list[int]:
        return [a.index for a in self._active]

    def status(self, index: int) -> AdapterStatus | None:
        adapter = self._adapters.get(index)
        return adapter.status if adapter else None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _activate(self, adapter: Adapter) -> None:
        self._pending.remove(adapter)
        self._active.append(adapter)
        adapter.active = True
        adapter.activated_at = self._clock()
        self._budget -= adapter.cost or 0.0
        if adapter.spec.is_base:
            adapter.loaded = True
            adapter.status = AdapterStatus.READY
        else:
            self._spawn(self._sync(adapter, after=tuple(self._offloads)))

    def _deactivate(self, adapter: Adapter) -> None:
        self._active.remove(adapter)
        adapter.active = False
        adapter.status = AdapterStatus.DOWNLOADED
        self._budget += adapter.cost or 0.0
        if not adapter.spec.is_base:
            offload = self._spawn(self._sync(adapter))
            self._offloads.add(offload)
            offload.add_done_callback(self._offloads.discard)

    # ---- adapter RPCs ---------------------------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_download(self, adapter: Adapter) -> None:
        if adapter.spec.is_base:
            adapter.cost = 0.0
            adapter.status = AdapterStatus.DOWNLOADED
        else:
            self._spawn(self._download(adapter))

    def _current(self, adapter: Adapter) -> bool:
        return self._adapters.get(adapter.index) is adapter

    async def _download(self, adapter: Adapter) -> None:
        started = time.monotonic()
        try:
            cost = await self._client.download_adapter(adapter.spec)
        except Exception as error:  # any failure is this adapter's failure, reported to its requests
            self._metrics.inc("request_failure", err="download_adapter")
            self._fail(adapter, str(error))
            return
        self._metrics.adapter_step(adapter.spec, "download", time.monotonic() - started)
        if self._current(adapter):
            adapter.cost = max(cost, 0.0)
            adapter.status = AdapterStatus.DOWNLOADED
            self._on_change()

    async def _sync(self, adapter: Adapter, after: tuple[asyncio.Task, ...] = ()) -> None:
        """Load or offload until the shards match whether the adapter is wanted active right now.

        A load first waits for the offloads decided before it (`after`): they free the memory it is counted in.
        """
        if after:
            await asyncio.wait(after)
        step = "load"
        try:
            async with adapter.lock:
                while self._current(adapter) and adapter.active != adapter.loaded:
                    step = "load" if adapter.active else "offload"
                    call = self._client.load_adapter if adapter.active else self._client.offload_adapter
                    started = time.monotonic()
                    await call(adapter.spec, adapter.index)
                    self._metrics.adapter_step(adapter.spec, step, time.monotonic() - started)
                    adapter.loaded = not adapter.loaded
        except Exception as error:
            self._metrics.inc("request_failure", err=f"{step}_adapter")
            self._fail(adapter, str(error))
            return
        if self._current(adapter) and adapter.active and adapter.loaded:
            adapter.status = AdapterStatus.READY
            self._on_change()

    def _fail(self, adapter: Adapter, message: str) -> None:
        """Forget the adapter (a later request retries it) and fail every request waiting for it."""
        if not self._current(adapter):
            return
        logger.warning("adapter %s failed: %s", ",".join(adapter.spec.ids), message)
        del self._adapters[adapter.index]
        if adapter.active:
            self._active.remove(adapter)
            self._budget += adapter.cost or 0.0
        elif adapter.tracked:
            self._pending.remove(adapter)
        error = GenerationError(message)
        for entry in self.queues.drain(adapter.index):
            entry.fail(error)
        self._on_change()
