"""`/health` answers from a recent successful batching step, and asks the shards (Health RPC) otherwise."""
from __future__ import annotations

import pytest

from router.health import Health
from tests.test_router_support import router_stack, run, words

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_recent_successful_step_answers_and_anything_else_asks_the_shards():
    asked: list[float] = []
    clock = Clock()

    async def ask_shards() -> None:
        asked.append(clock.now)
        if clock.now > 200:
            raise RuntimeError("shard gone")

    health = Health(ask_shards, recent_s=5.0, clock=clock)

    async def scenario():
        await health.check()
        assert asked == [100.0], "no step yet"
        health.step(succeeded=True)
        clock.now = 105.0
        await health.check()
        assert asked == [100.0], "a step 5 s ago is recent"
        clock.now = 105.5
        await health.check()
        assert asked == [100.0, 105.5], "a step 5.5 s ago is not"
        health.step(succeeded=True)
        health.step(succeeded=False)
        await health.check()
        assert asked == [100.0, 105.5, 105.5], "the latest step failed"
        clock.now = 300.0
        with pytest.raises(RuntimeError, match="shard gone"):
            await health.check()

    run(scenario())


def test_health_probe_skips_the_shards_right_after_a_step():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            shard = stack.shards[0]
            assert (await stack.http.get("/health")).status_code == 200
            assert shard.health_calls == 1, "idle: the shards are asked"
            ok = await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 2}})
            assert ok.status_code == 200
            shard.healthy = False  # only the Health RPC would tell
            for path in ("/health", "/ping"):
                assert (await stack.http.get(path)).status_code == 200, path
            assert shard.health_calls == 1, "a step just succeeded: no Health RPC"
            failed = await stack.http.post("/generate", json={"inputs": "FAIL", "parameters": {"max_new_tokens": 2}})
            assert failed.status_code == 424
            reply = await stack.http.get("/health")
            assert reply.status_code == 503 and reply.json()["error_type"] == "healthcheck"
            assert shard.health_calls == 2, "the latest step failed: the shards are asked"

    run(scenario())
