"""The shard's gRPC service: turns RPCs into Generator calls and keeps live batches by id.

Every tensor operation runs on one model thread, from loading the weights on (see `model_thread`): the model and
KV cache are not thread-safe, every shard of a tensor-parallel group must run the same collectives in the same
order, and on CPU each thread that runs parallel torch ops gets its own OpenMP team. A second team (say, the main
thread's from loading the model) makes OpenMP put its workers to sleep between parallel regions instead of
spinning, which cost a quarter of CPU decode throughput. The event loop stays free to answer Health and Info, and
adapter downloads run on other threads, doing no tensor work. Reading an adapter's files into host tensors (the
`DownloadAdapter` RPC) runs on one reader thread whose torch ops are single-threaded, so it forms no OpenMP team
and decode keeps running meanwhile; only writing the adapter into the device pools (`LoadAdapter`) takes the model
thread. Any exception becomes a gRPC error carrying its message.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from lorax_server import tracing
from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey
from lorax_server.batch import Batch
from lorax_server.dist import Parallel
from lorax_server.generation import Generator
from lorax_server.kv_cache import BLOCK_SIZE, OutOfBlocks
from lorax_server.models import implementation
from lorax_server.pb import generate_pb2, generate_pb2_grpc

logger = logging.getLogger(__name__)


def _rpc(method):
    """Map exceptions to gRPC statuses with the Python message (the router shows it to the user)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except OutOfBlocks as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except AdapterError as exc:
            logger.warning("%s failed: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (KeyError, ValueError) as exc:
            logger.warning("%s failed: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).strip("'\""))
        except Exception as exc:  # the shard must survive any single bad call
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    return wrapper


def model_thread(device: torch.device | None = None) -> ThreadPoolExecutor:
    """The one thread that runs a shard's tensor work (the CUDA current device is per thread: set it there too).
    Its OpenMP thread count is fixed when it starts, before the reader thread lowers the default for new threads."""

    def start() -> None:
        torch.get_num_threads()  # torch settles a thread's OpenMP team size on first use
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=start)


def reader_thread() -> ThreadPoolExecutor:
    """The thread that reads adapters into host tensors beside decode: its torch ops run on this thread alone (a
    second OpenMP team would make the model thread's workers sleep between parallel regions)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-reader", initializer=lambda: torch.set_num_threads(1))


class LoraxService(generate_pb2_grpc.LoraxServiceServicer):
    def __init__(self, generator: Generator, parallel: Parallel, uds_base: str, worker: ThreadPoolExecutor | None = None):
        """worker: the model thread the generator was built on (a new one when built on the calling thread)."""
        self.generator = generator
        self.parallel = parallel
        self.uds_base = uds_base
        self.batches: dict[int, Batch] = {}
        self._worker = worker or model_thread()
        self._reader = reader_thread()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _pop(self, batch_id: int) -> Batch:
        if batch_id not in self.batches:
            raise KeyError(f"batch {batch_id} not found")
        return self.batches.pop(batch_id)

    @_rpc
    async def Info(self, request, context):
        model = self.generator.model
        return generate_pb2.InfoResponse(
            requires_padding=False,
            dtype=str(model.dtype),
            device_type=self.generator.device.type,
            window_size=model.cfg.sliding_window,
            block_size=BLOCK_SIZE,
            speculate=0,
            supports_generation=True,
            requires_block_allocator=False,
            model_implementation=implementation(model),
        )

    @_rpc
    async def Health(self, request, context):
        await self._run(lambda: torch.ones(1, device=self.generator.device).sum().item())
        return generate_pb2.HealthResponse()

    @_rpc
    async def ServiceDiscovery(self, request, context):
        urls = [f"unix://{self.uds_base}-{rank}" for rank in range(self.parallel.world_size)]
        return generate_pb2.ServiceDiscoveryResponse(urls=urls)

    @_rpc
    async def ClearCache(self, request, context):
        ids = [request.id] if request.HasField("id") else list(self.batches)
        for batch_id in ids:
            batch = self.batches.pop(batch_id, None)
            if batch is not None:
                batch.release(self.generator.cache)
        return generate_pb2.ClearCacheResponse()

    @_rpc
    async def Warmup(self, request, context):
        for batch in self.batches.values():
            batch.release(self.generator.cache)
        self.batches.clear()
        needed = max(request.max_prefill_tokens, request.max_input_length + request.max_new_tokens)
        capacity = await self._run(self.generator.warmup, request.batch, needed)
        logger.info("KV cache holds %d tokens", capacity)
        return generate_pb2.WarmupResponse(max_supported_total_tokens=capacity)

    @_rpc
    async def Prefill(self, request, context):
        def step():
            batch = self.generator.new_batch(request.batch)
            try:
                return self.generator.prefill(batch)
            except Exception:
                batch.release(self.generator.cache)
                raise

        pb = request.batch
        tokens = sum(len(r.tokenized_inputs.ids) for r in pb.requests)
        with tracing.span("prefill", batch_id=pb.id, size=len(pb.requests), tokens=tokens, rank=self.parallel.rank):
            generations, batch = await self._run(step)
        return self._answer(generate_pb2.PrefillResponse, generations, batch)

    @_rpc
    async def Decode(self, request, context):
        if not request.batches:
            raise ValueError("Decode needs at least one batch")
        batches = [self._pop(b.id) for b in request.batches]

        def step():
            try:
                return self.generator.decode(batches)
            except Exception:
                for b in batches:
                    b.release(self.generator.cache)
                raise

        ids = [b.id for b in request.batches]
        size = sum(b.size for b in request.batches)
        with tracing.span("decode", batch_ids=ids, size=size, rank=self.parallel.rank):
            generations, batch = await self._run(step)
        return self._answer(generate_pb2.DecodeResponse, generations, batch)

    def _answer(self, response_type, generations, batch: Batch | None):
        response = response_type(generations=generations)
        if batch is not None:
            self.batches[batch.id] = batch
            response.batch.CopyFrom(batch.to_pb())
        return response

    @_rpc
    async def FilterBatch(self, request, context):
        batch = self._pop(request.batch_id)
        try:
            kept = batch.filter(list(request.request_ids), self.generator.cache)
        except ValueError:
            batch.release(self.generator.cache)
            raise
        self.batches[kept.id] = kept
        return generate_pb2.FilterBatchResponse(batch=kept.to_pb())

    @_rpc
    async def DownloadAdapter(self, request, context):
        key = AdapterKey.from_pb(request.adapter_parameters, request.adapter_source)
        if key.is_base:
            return generate_pb2.DownloadAdapterResponse(downloaded=False, memory=self.generator.adapters.memory())
        token = request.api_token if request.HasField("api_token") else None
        registry = self.generator.adapters
        folders = await asyncio.to_thread(registry.download, key, token)  # network/disk: off the model thread
        read = functools.partial(registry.fetch, key, token, False, folders)
        weights = await asyncio.get_running_loop().run_in_executor(self._reader, read)
        return generate_pb2.DownloadAdapterResponse(
            downloaded=True, memory_fraction=registry.memory_fraction(weights), memory=registry.memory()
        )

    @_rpc
    async def LoadAdapter(self, request, context):
        key = AdapterKey.from_pb(request.adapter_parameters, request.adapter_source)
        if key.is_base:
            return generate_pb2.LoadAdapterResponse(loaded=False, memory=self.generator.adapters.memory())
        token = request.api_token if request.HasField("api_token") else None
        registry = self.generator.adapters
        folders = await asyncio.to_thread(registry.download, key, token)
        await self._run(registry.load, key, request.adapter_index, token, False, folders)
        return generate_pb2.LoadAdapterResponse(loaded=True, memory=registry.memory())

    @_rpc
    async def OffloadAdapter(self, request, context):
        key = AdapterKey.from_pb(request.adapter_parameters, request.adapter_source)
        if key.is_base or request.adapter_index == 0:  # index 0 is the base model or the static adapter
            return generate_pb2.OffloadAdapterResponse(offloaded=False, memory=self.generator.adapters.memory())
        offloaded = await self._run(self.generator.adapters.offload, request.adapter_index)
        return generate_pb2.OffloadAdapterResponse(offloaded=offloaded, memory=self.generator.adapters.memory())


async def serve(service: LoraxService, socket_path: str) -> None:
    """Serve on unix://socket_path until cancelled; the socket appears only now, after the model loaded."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**31 - 1)])
    generate_pb2_grpc.add_LoraxServiceServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    logger.info("shard %d serving on unix://%s", service.parallel.rank, socket_path)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=2)
