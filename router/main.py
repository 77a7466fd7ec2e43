"""`lorax-router`: flags (spec 1.6, router defaults of 3.1), tokenizer, shard warmup, then uvicorn until a signal.

SIGTERM/SIGINT stop accepting connections and let in-flight requests and streams finish for up to
`GRACEFUL_SHUTDOWN_S`; the batching loop keeps running meanwhile and stops last.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer

from router.app import create_app
from router.auth import METRICS_ENV, load_api_keys, load_metrics_require_key
from router.batching import BatchingConfig, BatchingLoop
from router.health import Health
from router.infer import Infer
from router.metrics import Metrics
from router.model_tokenizer import ModelTokenizer
from router.scheduler import Scheduler
from router.schemas import Info
from router.shards import ShardedClient, ShardError
from router.startup import StartupError, warmup
from router.state import AppConfig
from router.validation import AdapterSpec, TokenizerPool, ValidationLimits, Validator

if TYPE_CHECKING:
    from router.tracing import RequestTracer

logger = logging.getLogger("router")

GRACEFUL_SHUTDOWN_S = 30
# Idle keep-alive connections are held longer than the usual load-balancer idle timeout (60 s): a server that closes
# them first (uvicorn's default is 5 s) races clients and proxies reusing them, which see a reset instead of a reply.
KEEP_ALIVE_S = 75


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lorax-router", description="HTTP router in front of the LoRAX shards.")
    add = parser.add_argument
    add("--max-concurrent-requests", type=int, default=1024)
    add("--max-best-of", type=int, default=2)
    add("--max-stop-sequences", type=int, default=10)
    add("--max-input-length", type=int, default=1792)
    add("--max-total-tokens", type=int, default=2048)
    add("--max-batch-prefill-tokens", type=int, default=4096)
    add("--max-batch-total-tokens", type=int, default=None)
    add("--max-active-adapters", type=int, default=128)
    add("--adapter-cycle-time-s", type=float, default=2.0)
    add("--waiting-served-ratio", type=float, default=0.3)
    add("--max-waiting-tokens", type=int, default=20)
    add("--validation-workers", type=int, default=2)
    add("--hostname", default="0.0.0.0")
    add("--port", "-p", type=int, default=3000)
    add("--master-shard-uds-path", default="/tmp/lorax-server-0")
    add("--tokenizer-name", required=True, help="local folder or hub id of the tokenizer")
    add("--model-id", default=None, help="shown in /info (defaults to --tokenizer-name)")
    add("--adapter-source", default="hub", help="default source of per-request adapters")
    add("--revision", default=None)
    add("--json-output", action="store_true")
    add("--otlp-endpoint", default=None)
    add("--cors-allow-origin", action="append", default=[])
    add("--ngrok", action="store_true")
    add("--ngrok-authtoken", default=None)
    add("--ngrok-edge", default=None)
    args = parser.parse_args(argv)
    if args.validation_workers <= 0:
        parser.error("`--validation-workers` must be > 0")
    if args.max_concurrent_requests <= 0:
        parser.error("`--max-concurrent-requests` must be > 0")
    return args


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "timestamp": self.formatTime(record),
                "level": record.levelname,
                "target": record.name,
                "message": record.getMessage(),
            }
        )


def setup_logging(json_output: bool) -> None:
    handler = logging.StreamHandler()
    if json_output:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def load_tokenizer(name: str, revision: str | None) -> Tokenizer:
    """The fast (Rust) tokenizer of a local folder or hub id; the shards trust the ids it produces."""
    from transformers import AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise StartupError(f"cannot load the tokenizer {name}: {error}") from error
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise StartupError(f"no fast tokenizer (tokenizer.json) for {name}")
    return backend


def bind_socket(hostname: str, port: int) -> socket.socket:
    """Bind hostname:port, falling back to 0.0.0.0 (with a warning) when the hostname cannot be bound."""
    try:
        return _bind(hostname, port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} is already in use") from error
        logger.warning("cannot bind %s (%s); binding 0.0.0.0 instead", hostname, error)
        return _bind("0.0.0.0", port)


def _bind(hostname: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def start_ngrok(args: argparse.Namespace) -> None:
    """Expose the port through an ngrok edge; refuses to start without the package or credentials."""
    try:
        import ngrok
    except ImportError:
        raise StartupError("--ngrok needs the `ngrok` Python package (pip install ngrok)") from None
    if not args.ngrok_authtoken or not args.ngrok_edge:
        raise StartupError("--ngrok needs --ngrok-authtoken and --ngrok-edge")
    ngrok.forward(f"localhost:{args.port}", authtoken=args.ngrok_authtoken, labels=f"edge:{args.ngrok_edge}")


@dataclass
class Router:
    """Everything that serves requests once the shards are warm; `start` runs the batching loop."""

    app: FastAPI
    scheduler: Scheduler
    batching: BatchingLoop
    tokenizers: TokenizerPool
    tracer: RequestTracer | None = None
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.batching.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.scheduler.close()
        self.tokenizers.close()
        if self.tracer is not None:
            self.tracer.shutdown()


async def build_router(args: argparse.Namespace, tokenizer: Tokenizer, client: ShardedClient) -> Router:
    """Warm the shards up and wire validation, scheduling, batching and routes together."""
    try:
        api_keys, metrics_require_key = load_api_keys(), load_metrics_require_key()
    except (OSError, ValueError) as error:
        raise StartupError(str(error)) from error
    if metrics_require_key and not api_keys:
        logger.warning("%s has no effect without LORAX_API_KEY: /metrics stays open like every route", METRICS_ENV)
    shard_info = await client.info()
    block_size = max(shard_info.block_size, 1)
    max_batch_total_tokens = await warmup(
        client,
        max_input_length=args.max_input_length,
        max_total_tokens=args.max_total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
        block_size=block_size,
    )
    preloaded = {
        AdapterSpec(ids=tuple(p.adapter_parameters.adapter_ids)).key: p.adapter_index
        for p in shard_info.preloaded_adapters
    }
    batching: BatchingLoop
    health = Health(client.health)
    metrics = Metrics(args.max_input_length, args.max_total_tokens)
    metrics.adapter_tiers(lambda: client.adapter_memory)
    scheduler = Scheduler(
        client,
        max_active_adapters=args.max_active_adapters,
        adapter_cycle_time_s=args.adapter_cycle_time_s,
        on_change=lambda: batching.notify(),
        preloaded=preloaded,
        metrics=metrics,
    )
    batching = BatchingLoop(
        client,
        scheduler,
        BatchingConfig(
            max_batch_prefill_tokens=args.max_batch_prefill_tokens,
            max_batch_total_tokens=max_batch_total_tokens,
            max_waiting_tokens=args.max_waiting_tokens,
            waiting_served_ratio=args.waiting_served_ratio,
            block_size=block_size,
            speculate=shard_info.speculate,
        ),
        metrics,
        health,
    )
    tokenizers = TokenizerPool(tokenizer, args.validation_workers)
    limits = ValidationLimits(
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_input_length=args.max_input_length,
        max_total_tokens=args.max_total_tokens,
    )
    tracer = request_tracer(args.otlp_endpoint)
    validator = Validator(tokenizers, limits, args.adapter_source)
    infer = Infer(validator, scheduler.append, args.max_concurrent_requests, metrics, tracer)
    info = Info(
        model_id=args.model_id or args.tokenizer_name,
        model_dtype=shard_info.dtype,
        model_device_type=shard_info.device_type,
        model_implementation=shard_info.model_implementation or None,
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_input_length=args.max_input_length,
        max_total_tokens=args.max_total_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        max_batch_total_tokens=max_batch_total_tokens,
        max_waiting_tokens=args.max_waiting_tokens,
        validation_workers=args.validation_workers,
    )
    config = AppConfig(
        info=info, default_adapter_source=args.adapter_source, cors_allow_origins=tuple(args.cors_allow_origin),
        tokenizer=ModelTokenizer.load(tokenizer, args.tokenizer_name, args.revision),
        adapter_tiers=lambda: client.adapter_memory,
        api_keys=api_keys, metrics_require_key=metrics_require_key,
    )
    return Router(create_app(infer, health.check, config, metrics), scheduler, batching, tokenizers, tracer)


def request_tracer(otlp_endpoint: str | None) -> RequestTracer | None:
    """Request spans exported to `otlp_endpoint` as service "lorax-router"; None (no tracing) without one."""
    if not otlp_endpoint:
        return None
    from lorax_server.tracing import ROUTER_SERVICE, otlp_provider
    from router.tracing import RequestTracer

    return RequestTracer(otlp_provider(otlp_endpoint, ROUTER_SERVICE))


async def serve(args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    try:
        client = await ShardedClient.connect(args.master_shard_uds_path)
    except TimeoutError:
        raise StartupError(f"no shard answers on {args.master_shard_uds_path}") from None
    try:
        router = await build_router(args, tokenizer, client)
        sock = bind_socket(args.hostname, args.port)
        server = uvicorn.Server(
            uvicorn.Config(router.app, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False,
                           timeout_keep_alive=KEEP_ALIVE_S)
        )
        # uvicorn re-raises the signal it handled once it is done; by then that must be a no-op so cleanup runs.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        router.start()
        try:
            await server.serve(sockets=[sock])
        finally:
            await router.stop()
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.json_output)
    try:
        if args.ngrok:
            start_ngrok(args)
        tokenizer = load_tokenizer(args.tokenizer_name, args.revision)
        asyncio.run(serve(args, tokenizer))
    except (StartupError, ShardError) as error:
        logger.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
