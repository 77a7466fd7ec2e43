"""The continuous-batching loop (spec 4.6, 4.8): new requests join a running batch between decode steps.

Budgets follow the shard contract: a batch's prompts must fit `max_batch_prefill_tokens`, and every request reserves
`input_len + max_new_tokens` KV tokens (rounded up to whole blocks, as the shard allocates them) out of
`max_batch_total_tokens`, minus what the running batch already holds (`CachedBatch.max_tokens`). A batch beyond those
budgets would be refused by the shard, so it is never sent.

Every entry taken from the queue ends with exactly one final event: its End, the shard's error (424) when its batch
fails, or `Incomplete generation` if a shard dropped it without finishing it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass
from collections.abc import Awaitable
from typing import Protocol

from lorax_server.pb import generate_pb2
from router.errors import GenerationError, IncompleteGenerationError, ValidationError
from router.health import Health
from router.metrics import Metrics
from router.queue import EndEvent, Entry, PrefillEvent, TokenEvent
from router.schemas import AlternativeToken, FinishReason, PrefillToken, Token
from router.scheduler import Scheduler

logger = logging.getLogger(__name__)

FINISH_REASONS: dict[int, FinishReason] = {
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_EOS_TOKEN: "eos_token",
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_waiting_tokens: int = 20
    waiting_served_ratio: float = 0.3
    block_size: int = 16
    speculate: int = 0


class GenerationClient(Protocol):
    async def prefill(
        self, batch: generate_pb2.Batch
    ) -> tuple[list[generate_pb2.Generation], generate_pb2.CachedBatch | None]: ...
    async def decode(
        self, batches: list[generate_pb2.CachedBatch]
    ) -> tuple[list[generate_pb2.Generation], generate_pb2.CachedBatch | None]: ...
    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> generate_pb2.CachedBatch: ...
    async def clear_cache(self, batch_id: int | None = None) -> None: ...


class EntrySource(Protocol):
    @property
    def queued(self) -> int: ...

    def next_entry(self) -> Entry | None: ...
    def push_front(self, entry: Entry) -> None: ...


# ---- batch-assembly decisions ----------------------------------------------------------------------------------------


def join_min_size(batch_size: int, waiting_tokens: int, config: BatchingConfig) -> int | None:
    """How many queued requests make it worth pausing the running batch for a prefill.

    After `max_waiting_tokens` decode steps without a join, any number will do (None); before that, at least
    `waiting_served_ratio` times the running batch size.
    """
    if waiting_tokens >= config.max_waiting_tokens:
        return None
    return math.floor(batch_size * config.waiting_served_ratio)


def kv_tokens(entry: Entry, config: BatchingConfig) -> int:
    """KV tokens the shard reserves for a request: prompt + every new token, in whole blocks."""
    tokens = entry.request.input_length + entry.request.max_new_tokens + config.speculate
    return -(-tokens // config.block_size) * config.block_size


def assemble_batch(
    source: EntrySource, min_size: int | None, prefill_budget: int, token_budget: int, config: BatchingConfig
) -> list[Entry] | None:
    """Take queued entries in scheduling order while both budgets hold; all or nothing w.r.t. `min_size`."""
    queued = source.queued
    if prefill_budget <= 0 or token_budget <= 0 or queued == 0 or (min_size and queued < min_size):
        return None
    taken: list[Entry] = []
    prefill = total = 0
    while (entry := source.next_entry()) is not None:
        entry_prefill, entry_total = entry.request.input_length, kv_tokens(entry, config)
        if prefill + entry_prefill > prefill_budget or total + entry_total > token_budget:
            source.push_front(entry)
            break
        taken.append(entry)
        prefill += entry_prefill
        total += entry_total
    if not taken or (min_size and len(taken) < min_size):
        for entry in reversed(taken):
            source.push_front(entry)
        return None
    return taken


def to_request(entry: Entry) -> generate_pb2.Request:
    request = entry.request
    return generate_pb2.Request(
        id=entry.id,
        inputs=request.inputs,
        tokenized_inputs=generate_pb2.TokenizedInputs(ids=request.input_ids),
        truncate=request.input_length,
        parameters=request.parameters,
        stopping_parameters=request.stopping,
        prefill_logprobs=request.decoder_input_details,
        adapter_index=entry.adapter_index,
    )


# ---- routing shard output to entries -------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _prefill_tokens(tokens: generate_pb2.NextTokens) -> list[PrefillToken]:
    return [
        PrefillToken(id=i, text=text, logprob=_finite(logprob))
        for i, text, logprob in zip(tokens.ids, tokens.texts, tokens.logprobs)
    ]


def _token(tokens: generate_pb2.NextTokens, i: int, with_alternatives: bool) -> Token:
    alternatives = None
    if with_alternatives and i < len(tokens.alternative_tokens):
        alt = tokens.alternative_tokens[i]
        alternatives = [
            AlternativeToken(id=a, text=text, logprob=_finite(logprob))
            for a, text, logprob in zip(alt.ids, alt.texts, alt.logprobs)
        ]
    return Token(
        id=tokens.ids[i],
        text=tokens.texts[i],
        logprob=_finite(tokens.logprobs[i]),
        special=tokens.is_special[i],
        alternative_tokens=alternatives,
        skipped=i > 0,
    )


def route_generation(entry: Entry, generation: generate_pb2.Generation) -> None:
    """Turn one Generation into the entry's events: prompt details, one event per token, End on the last one."""
    request = entry.request
    if generation.HasField("error"):  # this request's own input failed on the shard; its batch goes on
        entry.fail(ValidationError(generation.error))
        return
    if request.decoder_input_details and generation.HasField("prefill_tokens"):
        entry.send(PrefillEvent(_prefill_tokens(generation.prefill_tokens)))
    tokens = generation.next_tokens
    last = len(tokens.ids) - 1
    with_alternatives = request.parameters.return_k_alternatives > 0
    finished = generation.HasField("generated_text")
    for i in range(last + 1):
        token = _token(tokens, i, with_alternatives)
        if i == last and finished:
            text = generation.generated_text
            entry.send(
                EndEvent(
                    token=token,
                    generated_text=text.text,
                    generated_tokens=text.generated_tokens,
                    finish_reason=FINISH_REASONS.get(text.finish_reason, "length"),
                    seed=text.seed if text.HasField("seed") else None,
                )
            )
        else:
            entry.send(TokenEvent(token))
    if finished and not entry.finished:  # a finish without any token: the shard broke the contract
        entry.fail(IncompleteGenerationError())


# ---- the loop ------------------------------------------------------------------------------------------------------


@dataclass
class _Running:
    """Cached batches on the shards (decoded together) and their live entries by request id."""

    batches: list[generate_pb2.CachedBatch]
    entries: dict[int, Entry]

    @property
    def max_tokens(self) -> int:
        return sum(batch.max_tokens for batch in self.batches)

    def adapters(self) -> set[int]:
        return {entry.adapter_index for entry in self.entries.values()}


class BatchingLoop:
    def __init__(
        self,
        client: GenerationClient,
        scheduler: Scheduler,
        config: BatchingConfig,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.client = client
        self.scheduler = scheduler
        self.config = config
        self.metrics = metrics or Metrics()
        self.health = health  # told every step's outcome, so /health can answer from it
        self.running: _Running | None = None  # read by the batch gauges
        self._wakeup = asyncio.Event()
        self._batch_ids = itertools.count()
        self.metrics.gauge("queue_length", lambda: scheduler.queued)
        self.metrics.gauge("batch_current_size", lambda: len(self.running.entries) if self.running else 0)
        self.metrics.gauge("batch_current_max_tokens", lambda: self.running.max_tokens if self.running else 0)

    def notify(self) -> None:
        """Called on every new request and adapter status change."""
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._serve()

    async def _serve(self) -> None:
        config = self.config
        while batch := self._next_batch(set(), None, config.max_batch_total_tokens):
            running = self.running = await self._prefill(batch)
            waiting_tokens = 1
            while running is not None:
                min_size = join_min_size(len(running.entries), waiting_tokens, config)
                budget = config.max_batch_total_tokens - running.max_tokens
                joining = self._next_batch(running.adapters(), min_size, budget)
                if joining:
                    self.metrics.inc("batch_concat", reason="wait_exceeded" if min_size is None else "backpressure")
                    added = await self._prefill(joining)
                    if added is not None:
                        running.batches.extend(added.batches)
                        running.entries.update(added.entries)
                    waiting_tokens = 1
                running = self.running = await self._decode(running)
                waiting_tokens += 1

    def _next_batch(self, in_use: set[int], min_size: int | None, token_budget: int) -> list[Entry] | None:
        self.scheduler.update_adapters(in_use)
        return assemble_batch(self.scheduler, min_size, self.config.max_batch_prefill_tokens, token_budget, self.config)

    async def _prefill(self, entries: list[Entry]) -> _Running | None:
        now = time.monotonic()
        for entry in entries:
            entry.batched_at = now
        batch = generate_pb2.Batch(
            id=next(self._batch_ids),
            requests=[to_request(entry) for entry in entries],
            size=len(entries),
            max_tokens=sum(kv_tokens(entry, self.config) for entry in entries),
        )
        running = _Running([], {entry.id: entry for entry in entries})
        self.metrics.observe("batch_next_size", len(entries))
        return await self._step("prefill", running, [batch.id], self.client.prefill(batch))

    async def _decode(self, running: _Running) -> _Running | None:
        batch_ids = [batch.id for batch in running.batches]
        return await self._step("decode", running, batch_ids, self.client.decode(running.batches))

    async def _step(
        self,
        method: str,
        running: _Running,
        batch_ids: list[int],
        call: Awaitable[tuple[list[generate_pb2.Generation], generate_pb2.CachedBatch | None]],
    ) -> _Running | None:
        """Run one Prefill/Decode; any failure fails this batch's entries and clears it, never the loop."""
        self.metrics.inc("batch_inference_count", method=method)
        cached = None
        try:
            started = time.monotonic()
            generations, cached = await call
            self.metrics.observe("batch_inference_duration", time.monotonic() - started, method=method)
            result = await self._advance(running, generations, cached)
        except Exception as error:
            self.metrics.inc("batch_inference_failure", method=method)
            if cached is not None and cached.id not in batch_ids:
                batch_ids = [*batch_ids, cached.id]
            self._record(succeeded=False)
            await self._fail(running, batch_ids, error)
            return None
        self.metrics.inc("batch_inference_success", method=method)
        self._record(succeeded=True)
        return result

    def _record(self, succeeded: bool) -> None:
        if self.health is not None:
            self.health.step(succeeded)

    async def _advance(
        self, running: _Running, generations: list[generate_pb2.Generation], cached: generate_pb2.CachedBatch | None
    ) -> _Running | None:
        """Deliver a step's tokens, then shrink the shard batch to the entries that still need it."""
        entries = running.entries
        for generation in generations:
            entry = entries.get(generation.request_id)
            if entry is not None and not entry.dropped:
                route_generation(entry, generation)
        kept = [rid for rid in cached.request_ids if rid in entries and not entries[rid].dropped] if cached else []
        live = {rid: entries[rid] for rid in kept}
        for entry in entries.values():
            if entry.id not in live:
                entry.fail(IncompleteGenerationError())  # no-op for finished entries
        if cached is None:
            return None
        if not kept:
            await self._clear(cached.id)
            return None
        if len(kept) < len(cached.request_ids):
            cached = await self.client.filter_batch(cached.id, kept)
        return _Running([cached], live)

    async def _fail(self, running: _Running, batch_ids: list[int], error: Exception) -> None:
        logger.error("batch %s failed: %s", batch_ids, error)
        failure = GenerationError(str(error))
        for entry in running.entries.values():
            entry.fail(failure)
        for batch_id in batch_ids:
            await self._clear(batch_id)

    async def _clear(self, batch_id: int) -> None:
        try:
            await self.client.clear_cache(batch_id)
        except Exception as error:  # the batch is gone from our side either way; keep serving
            logger.warning("ClearCache(%d) failed: %s", batch_id, error)
