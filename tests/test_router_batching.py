"""Batch-assembly decisions (spec 4.6, 4.8) as pure functions, then the loop against a fake shard over gRPC."""

from __future__ import annotations

import asyncio
import contextlib

from router.batching import BatchingConfig, BatchingLoop, assemble_batch, join_min_size, kv_tokens
from router.errors import GenerationError, ValidationError
from router.infer import collect
from router.scheduler import Scheduler
from router.shards import ShardedClient
from tests.test_router_support import fake_shards, make_request, run

CONFIG = BatchingConfig(max_batch_prefill_tokens=100, max_batch_total_tokens=1000, max_waiting_tokens=5,
                        waiting_served_ratio=0.5, block_size=16)


def base_scheduler(*requests) -> Scheduler:
    """A scheduler holding `requests` for the base model (which needs no adapter RPC), activated."""
    scheduler = Scheduler(client=None, max_active_adapters=4, adapter_cycle_time_s=2)
    for request in requests:
        scheduler.append(request)
    scheduler.update_adapters(set())
    return scheduler


def ids(entries) -> list[int]:
    return [entry.id for entry in entries]


def test_join_min_size():
    assert join_min_size(batch_size=10, waiting_tokens=1, config=CONFIG) == 5
    assert join_min_size(batch_size=3, waiting_tokens=4, config=CONFIG) == 1  # floor(1.5)
    assert join_min_size(batch_size=10, waiting_tokens=5, config=CONFIG) is None  # waited long enough: any size


def test_kv_tokens_round_up_to_blocks():
    scheduler = base_scheduler(make_request(4, 12), make_request(4, 13))
    first, second = scheduler.next_entry(), scheduler.next_entry()
    assert kv_tokens(first, CONFIG) == 16
    assert kv_tokens(second, CONFIG) == 32


def test_prefill_budget_stops_assembly_and_keeps_order():
    scheduler = base_scheduler(*(make_request(4, 4) for _ in range(3)))
    batch = assemble_batch(scheduler, None, prefill_budget=10, token_budget=1000, config=CONFIG)
    assert ids(batch) == [0, 1]
    assert scheduler.queued == 1 and scheduler.next_entry().id == 2


def test_kv_budget_counts_whole_blocks():
    requests = [make_request(4, 13) for _ in range(3)]  # 17 tokens each => 32 reserved
    batch = assemble_batch(base_scheduler(*requests), None, prefill_budget=100, token_budget=63, config=CONFIG)
    assert ids(batch) == [0]
    batch = assemble_batch(base_scheduler(*requests), None, prefill_budget=100, token_budget=64, config=CONFIG)
    assert ids(batch) == [0, 1]


def test_no_budget_or_nothing_queued():
    assert assemble_batch(base_scheduler(make_request(4, 4)), None, 0, 100, CONFIG) is None
    assert assemble_batch(base_scheduler(make_request(4, 4)), None, 100, 0, CONFIG) is None
    assert assemble_batch(base_scheduler(), None, 100, 100, CONFIG) is None


def test_min_size_not_reached_takes_nothing():
    scheduler = base_scheduler(make_request(4, 4), make_request(4, 4))
    assert assemble_batch(scheduler, 3, 100, 1000, CONFIG) is None
    assert scheduler.queued == 2


def test_min_size_cut_by_budget_returns_everything_in_order():
    scheduler = base_scheduler(*(make_request(4, 4) for _ in range(3)))
    assert assemble_batch(scheduler, 3, prefill_budget=8, token_budget=1000, config=CONFIG) is None
    assert scheduler.queued == 3
    assert ids(assemble_batch(scheduler, 2, prefill_budget=8, token_budget=1000, config=CONFIG)) == [0, 1]


def test_request_too_big_for_budget_is_not_taken():
    scheduler = base_scheduler(make_request(50, 4), make_request(4, 4))
    assert assemble_batch(scheduler, None, prefill_budget=40, token_budget=1000, config=CONFIG) is None
    assert scheduler.queued == 2  # FIFO: the big one keeps its place, the small one does not overtake it


# ---- the loop over a fake shard ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def loop_over_fake_shard(config: BatchingConfig, **shard_options):
    async with fake_shards(capacity=config.max_batch_total_tokens, **shard_options) as (shards, master):
        client = await ShardedClient.connect(master, timeout_s=5)
        loop: BatchingLoop
        scheduler = Scheduler(client, max_active_adapters=4, adapter_cycle_time_s=2, on_change=lambda: loop.notify())
        loop = BatchingLoop(client, scheduler, config)
        task = asyncio.create_task(loop.run())
        try:
            yield scheduler, shards[0]
        finally:
            task.cancel()
            await client.close()


def prefills(shard) -> list[list[int]]:
    return [request_ids for kind, request_ids in shard.log if kind == "prefill"]


def decodes_before_prefill(shard, request_id: int) -> int:
    count = 0
    for kind, request_ids in shard.log:
        if kind == "prefill" and request_id in request_ids:
            return count
        count += kind == "decode"
    raise AssertionError(f"request {request_id} was never prefilled")


def test_single_waiting_request_joins_after_max_waiting_tokens():
    config = BatchingConfig(max_batch_prefill_tokens=8, max_batch_total_tokens=4096, max_waiting_tokens=5,
                            waiting_served_ratio=0.5)

    async def scenario():
        async with loop_over_fake_shard(config) as (scheduler, shard):
            entries = [scheduler.append(make_request(2, 20)) for _ in range(5)]  # 4 fill the prefill budget
            await asyncio.gather(*(collect(entry) for entry in entries))
            assert prefills(shard)[0] == [0, 1, 2, 3]
            # floor(4 * 0.5) = 2 waiting requests needed; only 1 waits, so it joins once 5 tokens were waited for
            assert decodes_before_prefill(shard, 4) == 4

    run(scenario())


def test_enough_waiting_requests_join_at_once():
    config = BatchingConfig(max_batch_prefill_tokens=8, max_batch_total_tokens=4096, max_waiting_tokens=5,
                            waiting_served_ratio=0.5)

    async def scenario():
        async with loop_over_fake_shard(config) as (scheduler, shard):
            entries = [scheduler.append(make_request(2, 20)) for _ in range(6)]
            await asyncio.gather(*(collect(entry) for entry in entries))
            assert prefills(shard)[:2] == [[0, 1, 2, 3], [4, 5]]
            assert decodes_before_prefill(shard, 4) == 0
            assert shard.decode_calls[0] == [0, 1]  # the joined batch is decoded together with the running one

    run(scenario())


def test_kv_budget_is_never_exceeded_and_every_request_is_answered():
    config = BatchingConfig(max_batch_prefill_tokens=64, max_batch_total_tokens=64, max_waiting_tokens=1,
                            waiting_served_ratio=0.0)

    async def scenario():
        async with loop_over_fake_shard(config) as (scheduler, shard):
            entries = [scheduler.append(make_request(4, 8 + i % 5)) for i in range(12)]  # 16 KV tokens each
            results = await asyncio.gather(*(collect(entry) for entry in entries))
            assert [r.end.generated_tokens for r in results] == [8 + i % 5 for i in range(12)]
            assert shard.peak_reserved <= 64
            assert max(len(p) for p in prefills(shard)) <= 4
            assert sorted(i for p in prefills(shard) for i in p) == list(range(12))

    run(scenario())


def test_finished_requests_leave_through_filter_batch():
    config = BatchingConfig(max_batch_prefill_tokens=100, max_batch_total_tokens=4096)

    async def scenario():
        async with loop_over_fake_shard(config) as (scheduler, shard):
            entries = [scheduler.append(make_request(2, n)) for n in (2, 4, 6)]
            await asyncio.gather(*(collect(entry) for entry in entries))
            assert shard.filter_calls == [(0, [1, 2]), (0, [2])]
            assert shard.batches == {}  # the last request finishing ends the batch on the shard too

    run(scenario())


def test_cancelled_request_leaves_the_batch():
    config = BatchingConfig(max_batch_prefill_tokens=100, max_batch_total_tokens=4096)

    async def scenario():
        async with loop_over_fake_shard(config, step_delay=0.01) as (scheduler, shard):
            keep, leave = scheduler.append(make_request(2, 30)), scheduler.append(make_request(2, 30))
            waiting = asyncio.create_task(collect(leave))
            await asyncio.sleep(0.1)
            waiting.cancel()
            await collect(keep)
            assert any(kept == [keep.id] for _, kept in shard.filter_calls)
            assert sum(1 for _, ids in shard.log if ids == [0]) < 30  # the leaver did not run to the end

    run(scenario())


def test_failed_prefill_fails_its_batch_only():
    config = BatchingConfig(max_batch_prefill_tokens=4, max_batch_total_tokens=4096, max_waiting_tokens=1)

    async def scenario():
        async with loop_over_fake_shard(config) as (scheduler, shard):
            good = scheduler.append(make_request(4, 10))  # fills the prefill budget alone
            doomed = [scheduler.append(make_request(2, 3)) for _ in range(2)]
            for entry in doomed:
                object.__setattr__(entry.request, "inputs", "FAIL " + entry.request.inputs)
            results = await asyncio.gather(collect(good), *(collect(e) for e in doomed), return_exceptions=True)
            assert results[0].end.generated_tokens == 10
            for error in results[1:]:
                assert isinstance(error, GenerationError)
                assert error.message == "Request failed during generation: Server error: boom on request 1"
            assert 1 in shard.cleared  # the failed batch is cleared on the shard

    run(scenario())


def test_a_request_failing_on_the_shard_fails_alone():
    config = BatchingConfig(max_batch_prefill_tokens=100, max_batch_total_tokens=4096)

    async def scenario():
        async with loop_over_fake_shard(config) as (scheduler, shard):
            good, bad = scheduler.append(make_request(2, 6)), scheduler.append(make_request(2, 6))
            object.__setattr__(bad.request, "inputs", "BADSCHEMA " + bad.request.inputs)
            results = await asyncio.gather(collect(good), collect(bad), return_exceptions=True)
            assert results[0].end.generated_tokens == 6
            assert isinstance(results[1], ValidationError) and results[1].status_code == 422
            assert results[1].message == "Input validation error: invalid JSON schema: no"
            assert shard.filter_calls[0] == (0, [good.id]), "the failed request leaves its batch at once"

    run(scenario())
