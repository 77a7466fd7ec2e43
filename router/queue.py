"""Queued requests (`Entry`), the events they receive, and one FIFO queue per adapter (spec 4.2).

An entry is the only link between an HTTP handler and the batching loop: the loop pushes events into
`entry.events`, the handler reads them. `finished` guarantees at most one final event (End or Error) per entry, so an
accepted request always gets an answer and never two (none once its handler stopped listening). The entry keeps its
timings, and `on_final` lets the owner of a request record its outcome (metrics, traces) once, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from router.errors import InferError
from router.schemas import FinishReason, PrefillToken, Token
from router.validation import ValidRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillEvent:
    tokens: list[PrefillToken]


@dataclass(frozen=True)
class TokenEvent:
    token: Token


@dataclass(frozen=True)
class EndEvent:
    token: Token
    generated_text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None


@dataclass(frozen=True)
class ErrorEvent:
    error: InferError


Event = PrefillEvent | TokenEvent | EndEvent | ErrorEvent


@dataclass(eq=False)
class Entry:
    id: int
    request: ValidRequest
    adapter_index: int
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when its HTTP request arrived (before validation), if known
    batched_at: float | None = None
    finished_at: float | None = None
    skipped_tokens: int = 0
    cancelled: bool = False  # the client went away: leave the queue or the batch at the next step
    finished: bool = False  # the final event was sent, or nobody listens any more
    on_final: Callable[[Entry, Event | None], None] | None = None  # called once: final event, None if abandoned

    def send(self, event: Event) -> None:
        if self.finished:
            return
        self.events.put_nowait(event)
        if isinstance(event, (TokenEvent, EndEvent)) and event.token.skipped:
            self.skipped_tokens += 1
        if isinstance(event, (EndEvent, ErrorEvent)):
            self._finish(event)

    def fail(self, error: InferError) -> None:
        self.send(ErrorEvent(error))

    def cancel(self) -> None:
        """The handler stops listening (answered, or its client left): an unfinished entry is abandoned."""
        self.cancelled = True
        if not self.finished:
            self._finish(None)

    def _finish(self, event: Event | None) -> None:
        self.finished = True
        self.finished_at = time.monotonic()
        if self.on_final is not None:
            try:
                self.on_final(self, event)
            except Exception:  # recording an outcome must never fail the request or its batch
                logger.exception("recording the outcome of request %d failed", self.id)

    @property
    def dropped(self) -> bool:
        """Nothing more to do for this entry: it finished or nobody is listening."""
        return self.finished or self.cancelled


class AdapterQueues:
    """FIFO queues keyed by adapter index, with a total count kept in O(1)."""

    def __init__(self) -> None:
        self._queues: dict[int, deque[Entry]] = {}
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def count(self, adapter_index: int) -> int:
        queue = self._queues.get(adapter_index)
        return len(queue) if queue else 0

    def append(self, entry: Entry) -> None:
        self._queues.setdefault(entry.adapter_index, deque()).append(entry)
        self._total += 1

    def push_front(self, entry: Entry) -> None:
        """Return an entry taken for a batch that could not hold it; it keeps its place in line."""
        self._queues.setdefault(entry.adapter_index, deque()).appendleft(entry)
        self._total += 1

    def front(self, adapter_index: int) -> Entry | None:
        queue = self._queues.get(adapter_index)
        return queue[0] if queue else None

    def pop(self, adapter_index: int) -> Entry:
        entry = self._queues[adapter_index].popleft()
        self._total -= 1
        return entry

    def drain(self, adapter_index: int) -> list[Entry]:
        queue = self._queues.pop(adapter_index, None) or deque()
        self._total -= len(queue)
        return list(queue)
