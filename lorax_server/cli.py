"""`lorax-server serve | download-weights`: the shard process and the launcher's download step."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import click

from lorax_server import logs, tracing

logger = logging.getLogger("lorax_server")

QUANTIZE = ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq"]


@click.group()
def main() -> None:
    """LoRAX shard server."""


@main.command()
@click.argument("model_id")
@click.option("--adapter-id", default="", help="Static adapter applied to requests that name none.")
@click.option("--revision", default=None)
@click.option("--sharded", is_flag=True, help="Part of a tensor-parallel group (RANK/WORLD_SIZE from env).")
@click.option("--quantize", type=click.Choice(QUANTIZE), default=None)
@click.option("--compile", "compile_", is_flag=True,
              help="CUDA: decode steps of up to LORAX_COMPILE_MAX_BATCH_SIZE requests replay CUDA graphs. "
                   "CPU: no effect (a log line says why).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default=None)
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the checkpoint (transformers-backed path only).")
@click.option("--uds-path", default="/tmp/lorax-server", help="Socket base path; the rank is appended.")
@click.option("--logger-level", default="INFO")
@click.option("--json-output", is_flag=True)
@click.option("--otlp-endpoint", default=None)
@click.option("--source", default="hub")
@click.option("--adapter-source", default="hub")
def serve(model_id, adapter_id, revision, sharded, quantize, compile_, dtype, trust_remote_code, uds_path,
          logger_level, json_output, otlp_endpoint, source, adapter_source) -> None:
    """Load MODEL_ID and serve it over gRPC on unix://UDS_PATH-RANK."""
    logs.setup(logger_level, json_output)
    if sharded and "WORLD_SIZE" not in os.environ:
        raise click.UsageError("--sharded needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment")
    from lorax_server import dist
    from lorax_server.shard import build_service
    from lorax_server.server import model_thread, serve as serve_grpc

    parallel, device = dist.initialize()
    if compile_ and device.type != "cuda":
        logger.warning("--compile has no effect on CPU: torch.compile made decode slower here (README, Performance)")
    provider = None
    if otlp_endpoint:
        provider = tracing.otlp_provider(otlp_endpoint, tracing.SHARD_SERVICE)
        tracing.configure(provider)
    try:
        worker = model_thread(device)  # all tensor work, loading included, on one thread (see server.py)
        service = worker.submit(
            build_service, model_id, revision, source, dtype, parallel, device, uds_path, adapter_id, adapter_source,
            worker, trust_remote_code, quantize=quantize, cuda_graphs_on=compile_ and device.type == "cuda",
        ).result()
        socket_path = f"{uds_path}-{parallel.rank}"
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        asyncio.run(_run_until_signal(serve_grpc(service, socket_path)))
    finally:
        if provider is not None:
            provider.shutdown()  # sends the spans still buffered
        dist.shutdown()


async def _run_until_signal(coro) -> None:
    """Run `coro` until SIGTERM/SIGINT, then cancel it so the server stops cleanly."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        logger.info("shard stopping")


@main.command("download-weights")
@click.argument("model_id")
@click.option("--revision", default=None)
@click.option("--extension", default=".safetensors")
@click.option("--source", default="hub")
@click.option("--adapter-id", default="")
@click.option("--adapter-source", default="hub")
@click.option("--logger-level", default="INFO")
@click.option("--json-output", is_flag=True)
def download_weights(model_id, revision, extension, source, adapter_id, adapter_source, logger_level, json_output) -> None:
    """Make MODEL_ID (and --adapter-id) available locally: download, convert .bin/.gguf to safetensors."""
    logs.setup(logger_level, json_output)
    from lorax_server.sources import ModelNotFound, fetch_model
    from lorax_server.weights import convert_bin_files

    try:
        folder = fetch_model(model_id, revision, source)
    except ModelNotFound as exc:
        logger.error("%s", exc)
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    if not any(folder.glob("*.safetensors")):
        converted = convert_bin_files(folder)
        if not converted:
            click.echo(f"Error: model '{model_id}' (source {source}) has no safetensors or .bin weights", err=True)
            sys.exit(1)
    logger.info("model %s ready in %s", model_id, folder)
    if adapter_id:
        from lorax_server.adapters.config import AdapterError, read_config
        from lorax_server.adapters.sources import fetch_adapter

        try:
            read_config(fetch_adapter(adapter_id, adapter_source, trusted=True), adapter_id)
        except AdapterError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        logger.info("adapter %s ready", adapter_id)


if __name__ == "__main__":
    main()
