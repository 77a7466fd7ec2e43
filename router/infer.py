"""One request's life between the HTTP handler and the batching loop: permit, validation, queue, results.

Handlers hold a concurrency permit for as long as they answer (429 when none is free, without waiting). Leaving a
handler early (client gone, task cancelled) marks its entries cancelled, so the loop drops them at the next step.

Each request's outcome is recorded once, when it ends (request histograms, per-adapter series, trace spans), from the
timings its entry kept. The arrival time comes from `validate` through a context variable: the handler's task (and
the tasks it starts) carries it to `submit`, so routes need not pass it along.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.errors import InferError, OverloadedError
from router.metrics import Metrics
from router.queue import EndEvent, Entry, ErrorEvent, Event, PrefillEvent, TokenEvent
from router.schemas import GenerateParameters, PrefillToken, Token
from router.validation import ValidRequest, Validator

if TYPE_CHECKING:
    from router.tracing import RequestTracer

_arrived_at: contextvars.ContextVar[float | None] = contextvars.ContextVar("arrived_at", default=None)


class ConcurrencyLimit:
    """A non-blocking semaphore: requests beyond the limit are refused at once, never queued."""

    def __init__(self, limit: int) -> None:
        self._free = limit

    def acquire(self, permits: int = 1) -> None:
        if permits > self._free:
            raise OverloadedError()
        self._free -= permits

    def release(self, permits: int = 1) -> None:
        self._free += permits


@dataclass
class GenerationResult:
    request: ValidRequest
    end: EndEvent
    tokens: list[Token]
    prefill: list[PrefillToken]
    queued_at: float
    batched_at: float
    first_token_at: float
    finished_at: float = field(default_factory=time.monotonic)

    @property
    def mean_logprob(self) -> float:
        values = [t.logprob for t in self.tokens if t.logprob is not None]
        return math.fsum(values) / len(values) if values else -math.inf


class Infer:
    def __init__(
        self,
        validator: Validator,
        append: Callable[[ValidRequest], Entry],
        max_concurrent_requests: int,
        metrics: Metrics | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.validator = validator
        self.limit = ConcurrencyLimit(max_concurrent_requests)
        self.metrics = metrics or Metrics()
        self.tracer = tracer
        self._append = append

    async def validate(self, inputs: str, params: GenerateParameters, api_token: str | None) -> ValidRequest:
        started = time.monotonic()
        _arrived_at.set(started)
        try:
            request = await self.validator.validate(inputs, params, api_token=api_token)
        except InferError as error:
            if self.tracer is not None:
                self.tracer.rejected(started, error)
            raise
        self.metrics.validated(request.input_length, request.max_new_tokens, time.monotonic() - started)
        return request

    def submit(self, request: ValidRequest) -> Entry:
        """Queue a request; its outcome is recorded when its entry ends."""
        self.metrics.adapter_request(request.adapter)
        entry = self._enqueue(request)
        entry.on_final = self._record
        return entry

    def _enqueue(self, request: ValidRequest) -> Entry:
        entry = self._append(request)
        entry.started_at = _arrived_at.get()
        return entry

    def _record(self, entry: Entry, event: Event | None) -> None:
        if isinstance(event, EndEvent):
            started = entry.started_at or entry.queued_at
            finished = entry.finished_at or time.monotonic()
            batched = entry.batched_at or entry.queued_at
            self.metrics.succeeded(
                entry.request.adapter,
                total_s=finished - started,
                queue_s=batched - entry.queued_at,
                inference_s=finished - batched,
                generated_tokens=event.generated_tokens,
                skipped_tokens=entry.skipped_tokens,
            )
        if self.tracer is not None:
            self.tracer.request(entry, event)

    async def generate(self, request: ValidRequest) -> list[GenerationResult]:
        """All results, best first: `best_of` seeded copies run concurrently and the highest mean logprob wins.

        The caller holds one permit; the extra copies take their own (429 if they are not free). The copies are one
        request: only the winner's outcome is recorded (or the first copy's, if the request fails).
        """
        if request.best_of <= 1:
            return [await collect(self.submit(request))]
        extra = request.best_of - 1
        self.limit.acquire(extra)
        try:
            self.metrics.adapter_request(request.adapter)
            entries = [self._enqueue(request.with_seed(random.getrandbits(64))) for _ in range(request.best_of)]
            tasks = [asyncio.ensure_future(collect(entry)) for entry in entries]
            try:
                results = await asyncio.gather(*tasks)
            except InferError as error:
                self._record(entries[0], ErrorEvent(error))
                raise
            except asyncio.CancelledError:
                self._record(entries[0], None)
                raise
            finally:  # one failed copy fails the request: stop the others
                for task in tasks:
                    task.cancel()
        finally:
            self.limit.release(extra)
        best = max(range(len(results)), key=lambda i: results[i].mean_logprob)
        self._record(entries[best], results[best].end)
        return sorted(results, key=lambda r: r.mean_logprob, reverse=True)


async def collect(entry: Entry) -> GenerationResult:
    """Wait for an entry's End; raises its error. Cancelling the wait cancels the entry."""
    tokens: list[Token] = []
    prefill: list[PrefillToken] = []
    first_token_at = None
    try:
        while True:
            event = await entry.events.get()
            if first_token_at is None and isinstance(event, (TokenEvent, EndEvent)):
                first_token_at = time.monotonic()
            if isinstance(event, PrefillEvent):
                prefill = event.tokens
            elif isinstance(event, TokenEvent):
                tokens.append(event.token)
            elif isinstance(event, EndEvent):
                tokens.append(event.token)
                return GenerationResult(
                    request=entry.request,
                    end=event,
                    tokens=tokens,
                    prefill=prefill,
                    queued_at=entry.queued_at,
                    batched_at=entry.batched_at or entry.queued_at,
                    first_token_at=first_token_at,
                )
            else:
                raise event.error
    finally:
        entry.cancel()


async def stream(entry: Entry, keepalive_s: float) -> AsyncIterator[Event | None]:
    """An entry's events up to the final one; `None` after `keepalive_s` without any (time for a keep-alive)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(entry.events.get(), keepalive_s)
            except TimeoutError:
                yield None
                continue
            yield event
            if isinstance(event, (EndEvent, ErrorEvent)):
                return
    finally:
        entry.cancel()
