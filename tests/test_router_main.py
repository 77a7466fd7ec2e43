"""`lorax-router`: flags, tokenizer loading, warmup sizing, binding, and a real process shut down by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedTokenizerFast

from router.main import bind_socket, load_tokenizer, main, parse_args
from router.startup import (
    StartupError,
    check_batch_limits,
    check_request_limits,
    effective_max_batch_total_tokens,
    warmup_batch,
)
from tests.test_router_support import fake_shards, word_tokenizer, words

REPO = Path(__file__).resolve().parents[1]


def test_router_defaults_of_spec_3_1():
    args = parse_args(["--tokenizer-name", "t"])
    assert (args.max_concurrent_requests, args.max_best_of, args.max_stop_sequences) == (1024, 2, 10)
    assert (args.max_input_length, args.max_total_tokens, args.max_batch_prefill_tokens) == (1792, 2048, 4096)
    assert args.max_batch_total_tokens is None
    assert (args.waiting_served_ratio, args.max_waiting_tokens) == (0.3, 20)
    assert (args.max_active_adapters, args.adapter_cycle_time_s) == (128, 2)
    assert (args.hostname, args.port, args.master_shard_uds_path) == ("0.0.0.0", 3000, "/tmp/lorax-server-0")
    assert (args.validation_workers, args.adapter_source, args.model_id) == (2, "hub", None)
    assert args.cors_allow_origin == [] and not args.json_output and not args.ngrok


def test_repeatable_and_rejected_flags():
    args = parse_args(["--tokenizer-name", "t", "--cors-allow-origin", "a", "--cors-allow-origin", "b", "-p", "81"])
    assert args.cors_allow_origin == ["a", "b"] and args.port == 81
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer-name", "t", "--validation-workers", "0"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("words-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer()).save_pretrained(folder)
    return folder


def test_load_tokenizer_offline(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_tokenizer(str(tokenizer_dir), None).encode("w1 w2 zz").ids == [2, 3, 0]
    with pytest.raises(StartupError):
        load_tokenizer(str(tokenizer_dir / "missing"), None)


def test_warmup_batch_fills_the_prefill_budget():
    batch = warmup_batch(max_input_length=100, max_batch_prefill_tokens=250, max_total_tokens=120)
    lengths = [len(r.tokenized_inputs.ids) for r in batch.requests]
    assert lengths == [100, 100, 50]
    assert [r.truncate for r in batch.requests] == lengths
    assert [r.stopping_parameters.max_new_tokens for r in batch.requests] == [20, 20, 70]
    assert all(set(r.tokenized_inputs.ids) == {0} and r.prefill_logprobs for r in batch.requests)
    assert [r.id for r in batch.requests] == [0, 1, 2] and batch.id == 0 and batch.size == 3


def test_effective_max_batch_total_tokens():
    assert effective_max_batch_total_tokens(None, None, 2048, 4096) == 16000
    assert effective_max_batch_total_tokens(None, None, 20000, 4096) == 20000
    assert effective_max_batch_total_tokens(5000, None, 2048, 4096) == 5000
    assert effective_max_batch_total_tokens(None, 9000, 2048, 4096) == 9000
    assert effective_max_batch_total_tokens(5000, 9000, 2048, 4096) == 5000
    assert effective_max_batch_total_tokens(12000, 9000, 2048, 4096) == 9000


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ((20, 20, 40), "`max_input_length` must be < `max_total_tokens`"),
        ((50, 60, 40), "`max_batch_prefill_tokens` must be >= `max_input_length`"),
    ],
)
def test_request_limits(limits, message):
    with pytest.raises(StartupError, match=message):
        check_request_limits(*limits)


def test_batch_limits():
    check_batch_limits(max_total_tokens=32, max_batch_prefill_tokens=32, max_batch_total_tokens=32, block_size=16)
    with pytest.raises(StartupError, match="`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`"):
        check_batch_limits(32, 64, 48, 16)
    with pytest.raises(StartupError, match="`max_total_tokens` must be <= `max_batch_total_tokens`"):
        check_batch_limits(40, 32, 40, 16)  # 40 tokens take 3 blocks = 48 > 40


def test_warmup_too_small_for_one_request_aborts_startup():
    from tests.test_router_support import router_stack

    async def scenario():
        async with router_stack("--max-total-tokens", "2048", capacity=1000):
            pass

    with pytest.raises(StartupError, match="`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`"):
        asyncio.run(scenario())


def test_unbindable_hostname_falls_back(caplog):
    caplog.set_level(logging.WARNING)
    sock = bind_socket("256.1.2.3", 0)
    try:
        assert sock.getsockname()[0] == "0.0.0.0"
        assert "binding 0.0.0.0 instead" in caplog.text
    finally:
        sock.close()


def test_port_in_use_is_a_startup_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StartupError, match="already in use"):
            bind_socket("127.0.0.1", taken.getsockname()[1])


@pytest.mark.skipif(importlib.util.find_spec("ngrok") is not None, reason="ngrok is installed here")
def test_ngrok_without_the_package_exits_1(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--tokenizer-name", "unused", "--ngrok", "--ngrok-authtoken", "t", "--ngrok-edge", "e"])
    assert exited.value.code == 1
    assert "--ngrok needs the `ngrok` Python package" in capsys.readouterr().err


# ---- the real process ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def shards_in_thread(**options):
    """Fake shards on their own event loop thread, so a router subprocess can talk to them."""
    started: list = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve():
        async with fake_shards(**options) as (shards, master):
            started.append((shards[0], master))
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leave_early(port: int, body: dict, after_s: float) -> None:
    """Send a request and hang up before the answer."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
        time.sleep(after_s)


def test_process_serves_and_finishes_streams_on_sigterm(tokenizer_dir):
    port = free_port()
    with shards_in_thread(step_delay=0.05) as (shard, master):
        process = subprocess.Popen(
            [sys.executable, "-m", "router.main", "--tokenizer-name", str(tokenizer_dir), "--master-shard-uds-path",
             master, "--hostname", "127.0.0.1", "--port", str(port), "--max-input-length", "10",
             "--max-total-tokens", "64", "--max-batch-prefill-tokens", "64", "--json-output"],
            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, "router did not come up"
                time.sleep(0.2)

            # A client that hangs up leaves the batch at the next step instead of generating all 40 tokens.
            leave_early(port, {"inputs": words(2), "parameters": {"max_new_tokens": 40}}, after_s=0.3)
            time.sleep(0.3)
            assert shard.cleared[-1] == 0 and len(shard.decode_calls) < 20
            decodes = len(shard.decode_calls)
            body = {"inputs": words(2), "parameters": {"max_new_tokens": 40}}
            with httpx.stream("POST", f"{base}/generate_stream", json=body, timeout=30) as reply:
                next(line for line in reply.iter_lines() if line)
            time.sleep(0.3)
            assert shard.cleared[-1] == 1 and len(shard.decode_calls) - decodes < 20

            body = {"inputs": words(3), "parameters": {"max_new_tokens": 20}}
            with httpx.stream("POST", f"{base}/generate_stream", json=body, timeout=30) as reply:
                lines = reply.iter_lines()
                first = next(line for line in lines if line)
                process.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish
                events = [json.loads(first[5:])] + [json.loads(line[5:]) for line in lines if line]
            assert len(events) == 20 and events[-1]["generated_text"] is not None
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
            output = process.stdout.read().decode()
        first_line = json.loads(output.splitlines()[0])
        assert set(first_line) == {"timestamp", "level", "target", "message"}
