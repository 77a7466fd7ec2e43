"""Startup against the shards (spec 3.1 steps 4-6): warm up, size the token budget, refuse impossible limits."""

from __future__ import annotations

import logging
from typing import Protocol

from lorax_server.pb import generate_pb2

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """A configuration the shards cannot serve; the router exits with this message."""


class WarmupClient(Protocol):
    async def clear_cache(self, batch_id: int | None = None) -> None: ...
    async def warmup(
        self, batch: generate_pb2.Batch, max_input_length: int, max_prefill_tokens: int, max_new_tokens: int
    ) -> int | None: ...


def warmup_batch(max_input_length: int, max_batch_prefill_tokens: int, max_total_tokens: int) -> generate_pb2.Batch:
    """Worst-case prompts filling the prefill budget, each asking for all the tokens a request may have."""
    parameters = generate_pb2.NextTokenChooserParameters(
        temperature=0.9,
        top_k=10,
        top_p=0.9,
        typical_p=0.9,
        do_sample=False,
        seed=0,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        watermark=True,
    )
    requests = []
    remaining = max_batch_prefill_tokens
    while remaining > 0:
        length = min(max_input_length, remaining)
        requests.append(
            generate_pb2.Request(
                id=len(requests),
                inputs="_test " * length,
                tokenized_inputs=generate_pb2.TokenizedInputs(ids=[0] * length),
                truncate=length,
                parameters=parameters,
                stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=max_total_tokens - length),
                prefill_logprobs=True,
            )
        )
        remaining -= length
    return generate_pb2.Batch(
        id=0, requests=requests, size=len(requests), max_tokens=len(requests) * max_total_tokens
    )


def effective_max_batch_total_tokens(
    requested: int | None, supported: int | None, max_total_tokens: int, max_batch_prefill_tokens: int
) -> int:
    """The shard's KV capacity wins over a larger request; without one, the request or a generous default."""
    if supported is None:
        return requested or max(16000, max_total_tokens, max_batch_prefill_tokens)
    if requested is not None and requested > supported:
        logger.warning(
            "`--max-batch-total-tokens` %d is more than the shards can hold; using %d", requested, supported
        )
    return supported if requested is None else min(requested, supported)


def check_request_limits(max_input_length: int, max_total_tokens: int, max_batch_prefill_tokens: int) -> None:
    """Checks that need no shard: a request must leave room for one new token and fit one prefill."""
    if max_input_length >= max_total_tokens:
        raise StartupError(
            f"`max_input_length` must be < `max_total_tokens`. Given: {max_input_length} and {max_total_tokens}"
        )
    if max_input_length > max_batch_prefill_tokens:
        raise StartupError(
            f"`max_batch_prefill_tokens` must be >= `max_input_length`. "
            f"Given: {max_batch_prefill_tokens} and {max_input_length}"
        )


def check_batch_limits(
    max_total_tokens: int, max_batch_prefill_tokens: int, max_batch_total_tokens: int, block_size: int
) -> None:
    """Every valid request must fit an empty batch, or it would wait in its queue forever."""
    if max_batch_prefill_tokens > max_batch_total_tokens:
        raise StartupError(
            f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
            f"Given: {max_batch_prefill_tokens} and {max_batch_total_tokens}"
        )
    reserved = -(-max_total_tokens // block_size) * block_size
    if reserved > max_batch_total_tokens:
        raise StartupError(
            f"`max_total_tokens` must be <= `max_batch_total_tokens` (in blocks of {block_size}). "
            f"Given: {max_total_tokens} and {max_batch_total_tokens}"
        )


async def warmup(
    client: WarmupClient,
    max_input_length: int,
    max_total_tokens: int,
    max_batch_prefill_tokens: int,
    max_batch_total_tokens: int | None,
    block_size: int,
) -> int:
    """Warm the shards up and return the effective `max_batch_total_tokens`; raises `StartupError`."""
    check_request_limits(max_input_length, max_total_tokens, max_batch_prefill_tokens)
    await client.clear_cache()
    supported = await client.warmup(
        warmup_batch(max_input_length, max_batch_prefill_tokens, max_total_tokens),
        max_input_length=max_input_length,
        max_prefill_tokens=max_batch_prefill_tokens,
        max_new_tokens=max_total_tokens - max_input_length,
    )
    total = effective_max_batch_total_tokens(
        max_batch_total_tokens, supported, max_total_tokens, max_batch_prefill_tokens
    )
    check_batch_limits(max_total_tokens, max_batch_prefill_tokens, total, block_size)
    logger.info("max_batch_total_tokens = %d", total)
    return total
