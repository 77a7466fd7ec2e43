"""Queued requests (`Entry`), the events they receive, and one FIFO queue per adapter (spec 4.2).

An entry is the only link between an HTTP handler and the batching loop: the loop pushes events into
`entry.events`, the handler reads them. `finished` guarantees exactly one final event (End or Error) per entry, so an
accepted request always gets an answer and never two.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from router.errors import InferError
from router.schemas import FinishReason, PrefillToken, Token
from router.validation import ValidRequest


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
    batched_at: float | None = None
    cancelled: bool = False  # the client went away: leave the queue or the batch at the next step
    finished: bool = False  # the final event was sent

    def send(self, event: Event) -> None:
        if self.finished:
            return
        self.events.put_nowait(event)
        if isinstance(event, (EndEvent, ErrorEvent)):
            self.finished = True

    def fail(self, error: InferError) -> None:
        self.send(ErrorEvent(error))

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
