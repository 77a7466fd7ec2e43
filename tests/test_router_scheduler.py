"""Per-adapter queues and adapter activation/exchange (spec 4.1-4.5, with concurrent downloads)."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.errors import GenerationError
from router.infer import collect
from router.queue import AdapterQueues, Entry
from router.scheduler import AdapterStatus, Scheduler
from router.shards import ShardError
from router.validation import AdapterSpec
from tests.test_router_support import make_request, router_stack, run, words


class FakeAdapterClient:
    """Adapter RPCs without gRPC: configurable delay, error and cost per adapter id."""

    def __init__(self, delays=None, errors=None, costs=None):
        self.delays, self.errors, self.costs = delays or {}, errors or {}, costs or {}
        self.loaded: set[int] = set()
        self.calls: list[tuple[str, str]] = []

    async def download_adapter(self, spec: AdapterSpec) -> float:
        name = spec.ids[0]
        self.calls.append(("download", name))
        await asyncio.sleep(self.delays.get(name, 0))
        if name in self.errors:
            raise ShardError(self.errors[name])
        return self.costs.get(name, 0.1)

    async def load_adapter(self, spec: AdapterSpec, index: int) -> None:
        self.calls.append(("load", spec.ids[0]))
        self.loaded.add(index)

    async def offload_adapter(self, spec: AdapterSpec, index: int) -> None:
        self.calls.append(("offload", spec.ids[0]))
        self.loaded.discard(index)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle():
    """Let the adapter tasks run."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_queues_are_fifo_per_adapter():
    queues = AdapterQueues()
    entries = [Entry(id=i, request=make_request(1, 1), adapter_index=i % 2) for i in range(5)]
    for entry in entries:
        queues.append(entry)
    assert len(queues) == 5 and queues.count(0) == 3 and queues.count(1) == 2
    first = queues.pop(0)
    assert first.id == 0 and queues.front(0).id == 2
    queues.push_front(first)
    assert [e.id for e in queues.drain(0)] == [0, 2, 4]
    assert len(queues) == 2 and queues.front(0) is None


def test_adapter_indices_are_stable():
    scheduler = Scheduler(FakeAdapterClient(), max_active_adapters=2, adapter_cycle_time_s=2)
    base = AdapterSpec(ids=("__base_model__",))
    merged = AdapterSpec(ids=("a", "b"), weights=(0.5, 0.5))
    assert scheduler.adapter_index(base) == 0
    assert scheduler.adapter_index(AdapterSpec(ids=("a",))) == 1
    assert scheduler.adapter_index(merged) == 2
    assert scheduler.adapter_index(AdapterSpec(ids=("a", "b"), weights=(0.4, 0.6))) == 3
    assert scheduler.adapter_index(AdapterSpec(ids=("a",), source="s3")) == 1  # the source is not part of the key
    assert scheduler.adapter_index(merged) == 2


def test_at_most_max_active_adapters_and_idle_ones_give_way():
    async def scenario():
        client = FakeAdapterClient()
        scheduler = Scheduler(client, max_active_adapters=2, adapter_cycle_time_s=100)
        entries = {name: scheduler.append(make_request(2, 2, name)) for name in "abc"}
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.active_indices() == [1, 2] and client.loaded == {1, 2}
        assert scheduler.next_entry() is entries["a"] and scheduler.next_entry() is entries["b"]
        scheduler.update_adapters({1})  # a is in use by the running batch, b is idle and c waits
        await settle()
        assert scheduler.active_indices() == [1, 3] and client.loaded == {1, 3}
        assert scheduler.next_entry() is entries["c"]

    run(scenario())


def test_idle_adapters_stay_loaded_while_there_is_room():
    async def scenario():
        client, clock = FakeAdapterClient(), Clock()
        scheduler = Scheduler(client, max_active_adapters=3, adapter_cycle_time_s=2, clock=clock)
        first = scheduler.append(make_request(2, 2, "a"))
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.next_entry() is first  # a is now idle
        clock.now += 3  # and past its cycle time
        scheduler.append(make_request(2, 2, "b"))
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.active_indices() == [1, 2] and client.loaded == {1, 2}, "room for both: nothing offloaded"
        scheduler.append(make_request(2, 2, "c"))
        scheduler.append(make_request(2, 2, "d"))
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert 1 not in scheduler.active_indices() and len(scheduler.active_indices()) == 3, "full: the idle one goes"

    run(scenario())


def test_a_slow_download_does_not_block_the_adapters_behind_it():
    async def scenario():
        client = FakeAdapterClient(delays={"slow": 30})
        scheduler = Scheduler(client, max_active_adapters=4, adapter_cycle_time_s=2)
        scheduler.append(make_request(2, 2, "slow"))
        fast = scheduler.append(make_request(2, 2, "fast"))
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.status(1) is AdapterStatus.DOWNLOADING
        assert scheduler.next_entry() is fast
        await scheduler.close()

    run(scenario())


def test_active_adapter_rotates_out_after_cycle_time():
    async def scenario():
        client, clock = FakeAdapterClient(), Clock()
        scheduler = Scheduler(client, max_active_adapters=1, adapter_cycle_time_s=2, clock=clock)
        scheduler.append(make_request(2, 2, "a"))
        scheduler.append(make_request(2, 2, "b"))
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.active_indices() == [1]
        scheduler.update_adapters(set())  # a still has work and its time is not up
        assert scheduler.active_indices() == [1]
        clock.now += 3
        scheduler.update_adapters({1})  # in use: never rotated out
        assert scheduler.active_indices() == [1]
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.active_indices() == [2] and client.loaded == {2}
        assert scheduler.queues.count(1) == 1  # a keeps its queued request and waits in pending

    run(scenario())


def test_memory_budget_blocks_activation():
    async def scenario():
        client = FakeAdapterClient(costs={"a": 0.6, "b": 0.6})
        scheduler = Scheduler(client, max_active_adapters=4, adapter_cycle_time_s=100)
        scheduler.append(make_request(2, 2, "a"))
        scheduler.append(make_request(2, 2, "b"))
        await settle()
        scheduler.update_adapters(set())
        assert scheduler.active_indices() == [1]
        await settle()
        scheduler.next_entry()  # a's only request is taken: a becomes idle and gives way
        scheduler.update_adapters(set())
        assert scheduler.active_indices() == [2]

    run(scenario())


def test_failed_download_fails_waiting_requests_at_once_and_is_retried_later():
    async def scenario():
        client = FakeAdapterClient(errors={"bad": "no such adapter"})
        scheduler = Scheduler(client, max_active_adapters=2, adapter_cycle_time_s=2)
        doomed = [scheduler.append(make_request(2, 2, "bad")) for _ in range(2)]
        fine = scheduler.append(make_request(2, 2, "good"))
        await settle()
        for entry in doomed:
            with pytest.raises(GenerationError) as caught:
                await asyncio.wait_for(collect(entry), 1)
            assert caught.value.message == "Request failed during generation: Server error: no such adapter"
            assert caught.value.status_code == 424
        assert scheduler.status(1) is None and not fine.finished
        scheduler.update_adapters(set())
        await settle()
        assert scheduler.next_entry() is fine
        scheduler.append(make_request(2, 2, "bad"))
        await settle()
        assert client.calls.count(("download", "bad")) == 2

    run(scenario())


def test_failed_load_fails_only_that_adapter():
    class FailingLoad(FakeAdapterClient):
        async def load_adapter(self, spec, index):
            if spec.ids[0] == "bad":
                raise ShardError("adapter too large")
            await super().load_adapter(spec, index)

    async def scenario():
        scheduler = Scheduler(FailingLoad(), max_active_adapters=2, adapter_cycle_time_s=2)
        doomed = scheduler.append(make_request(2, 2, "bad"))
        fine = scheduler.append(make_request(2, 2, "good"))
        await settle()
        scheduler.update_adapters(set())
        await settle()
        assert doomed.events.get_nowait().error.message.endswith("Server error: adapter too large")
        assert scheduler.active_indices() == [2] and scheduler.next_entry() is fine

    run(scenario())


# ---- through the whole router and a fake shard over gRPC ---------------------------------------------------------


def test_two_active_adapters_serve_five():
    async def scenario():
        async with router_stack("--max-active-adapters", "2", "--adapter-cycle-time-s", "0.05") as stack:
            names = [f"org/lora-{i}" for i in range(5)]
            bodies = [{"inputs": words(3, i), "parameters": {"adapter_id": n, "max_new_tokens": 4}}
                      for i, n in enumerate(names * 2)]
            replies = await asyncio.gather(*(stack.http.post("/generate", json=body) for body in bodies))
            assert [r.status_code for r in replies] == [200] * 10, [r.text for r in replies]
            shard = stack.shards[0]
            assert shard.max_loaded <= 2
            assert {name for call, name in shard.adapter_calls if call == "load"} == set(names)
            assert {name for call, name in shard.adapter_calls if call == "download"} == set(names)
            assert replies[0].headers["x-adapter-id"] == "org/lora-0"

    run(scenario())


def test_failing_adapter_fails_only_its_requests_promptly():
    async def scenario():
        async with router_stack() as stack:
            shard = stack.shards[0]
            shard.download_error["bad"] = "adapter bad does not exist"
            shard.download_delay["slow"] = 3.0

            async def timed(adapter_id):
                started = time.monotonic()
                body = {"inputs": words(3), "parameters": {"adapter_id": adapter_id, "max_new_tokens": 3}}
                reply = await stack.http.post("/generate", json=body)
                return reply, time.monotonic() - started

            results = await asyncio.gather(timed("slow"), timed("bad"), timed("bad"), timed(None), timed("good"))
            (slow, slow_s), *others = results
            for reply, seconds in others[:2]:
                assert reply.status_code == 424 and seconds < 1.0
                assert reply.json() == {
                    "error": "Request failed during generation: Server error: adapter bad does not exist",
                    "error_type": "generation",
                }
            for reply, seconds in others[2:]:
                assert reply.status_code == 200 and seconds < 1.5
            assert slow.status_code == 200 and slow_s >= 3.0

    run(scenario())


def test_unknown_adapter_source_is_424_without_any_rpc():
    async def scenario():
        async with router_stack() as stack:
            body = {"inputs": words(2), "parameters": {"adapter_id": "x/y", "adapter_source": "ftp"}}
            reply = await stack.http.post("/generate", json=body)
            assert reply.status_code == 424
            assert reply.json()["error"] == (
                "Request failed during generation: Server error: Invalid source 'ftp' when downloading adapter 'x/y'"
            )
            assert stack.shards[0].adapter_calls == []
            body["parameters"]["adapter_source"] = "LOCAL"  # case-insensitive
            assert (await stack.http.post("/generate", json=body)).status_code == 200

    run(scenario())


def test_adapter_rpcs_failing_on_the_shard_surface_as_424():
    """The real shard answers adapter RPCs with an error until it supports them: 424 for those requests only."""

    async def scenario():
        async with router_stack() as stack:
            shard = stack.shards[0]
            shard.download_error["x/y"] = "dynamic LoRA adapters are not supported by this shard yet"
            lora = await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"adapter_id": "x/y"}})
            base = await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 2}})
            assert lora.status_code == 424 and "not supported by this shard yet" in lora.json()["error"]
            assert base.status_code == 200
            assert all(name != "__base_model__" for _, name in shard.adapter_calls)

    run(scenario())
