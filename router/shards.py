"""gRPC client for all shards of one deployment (spec 2.4): every call fans out, rank 0's answer is the answer.

Every RPC except DownloadAdapter goes to all shards concurrently with identical payloads (tensor-parallel shards must
run the same steps). Only rank 0 emits generations, but concatenating every shard's list costs nothing and stays
correct if that ever changes. A non-OK status becomes `ShardError` carrying the shard's Python message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from lorax_server.pb import generate_pb2, generate_pb2_grpc
from router.validation import AdapterSpec

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
]

# device: rows active adapters own; device_pool: what the slot pools hold on the device, used or free
ADAPTER_TIERS = ("device", "device_pool", "host", "disk")


class ShardError(Exception):
    """A shard refused or failed a call; `str(error)` is the message shown to users."""


def _url(path_or_url: str) -> str:
    return path_or_url if path_or_url.startswith("unix:") else f"unix://{path_or_url}"


async def _call(rpc: Awaitable[T]) -> T:
    try:
        return await rpc
    except grpc.aio.AioRpcError as error:
        raise ShardError(error.details() or error.code().name) from error


def adapter_parameters(spec: AdapterSpec) -> generate_pb2.AdapterParameters:
    return generate_pb2.AdapterParameters(
        adapter_ids=spec.ids,
        weights=spec.weights,
        merge_strategy=generate_pb2.MergeStrategy.Value(spec.merge_strategy.upper()),
        density=spec.density,
        majority_sign_method=generate_pb2.MajoritySignMethod.Value(spec.majority_sign_method.upper()),
    )


def adapter_source(spec: AdapterSpec) -> int:
    """The AdapterSource enum value; an unknown source fails this adapter without any RPC."""
    try:
        return generate_pb2.AdapterSource.Value(spec.source.upper())
    except ValueError:
        raise ShardError(f"Invalid source '{spec.source}' when downloading adapter '{','.join(spec.ids)}'") from None


class ShardedClient:
    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        if not channels:
            raise ValueError("at least one shard is needed")
        self._channels = channels
        self._stubs = [generate_pb2_grpc.LoraxServiceStub(channel) for channel in channels]
        # tier -> (adapters, bytes), from the shards' latest adapter RPC replies
        self.adapter_memory: dict[str, tuple[int, int]] = {tier: (0, 0) for tier in ADAPTER_TIERS}

    @classmethod
    async def connect(cls, master_uds_path: str, timeout_s: float = 60.0) -> ShardedClient:
        """Find every shard through the master's ServiceDiscovery and open one channel per shard."""
        master = grpc.aio.insecure_channel(_url(master_uds_path), options=_CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(master.channel_ready(), timeout_s)
            stub = generate_pb2_grpc.LoraxServiceStub(master)
            urls = (await _call(stub.ServiceDiscovery(generate_pb2.ServiceDiscoveryRequest()))).urls
        finally:
            await master.close()
        channels = [grpc.aio.insecure_channel(_url(url), options=_CHANNEL_OPTIONS) for url in urls]
        return cls(channels)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def _all(self, call: Callable[[generate_pb2_grpc.LoraxServiceStub], Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*(_call(call(stub)) for stub in self._stubs)))

    async def info(self) -> generate_pb2.InfoResponse:
        return (await self._all(lambda s: s.Info(generate_pb2.InfoRequest())))[0]

    async def health(self) -> None:
        await self._all(lambda s: s.Health(generate_pb2.HealthRequest()))

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = generate_pb2.ClearCacheRequest() if batch_id is None else generate_pb2.ClearCacheRequest(id=batch_id)
        await self._all(lambda s: s.ClearCache(request))

    async def warmup(
        self, batch: generate_pb2.Batch, max_input_length: int, max_prefill_tokens: int, max_new_tokens: int
    ) -> int | None:
        """The KV capacity in tokens: the smallest any shard reports (None if no shard knows)."""
        request = generate_pb2.WarmupRequest(
            batch=batch,
            max_input_length=max_input_length,
            max_prefill_tokens=max_prefill_tokens,
            max_new_tokens=max_new_tokens,
        )
        replies = await self._all(lambda s: s.Warmup(request))
        values = [r.max_supported_total_tokens for r in replies if r.HasField("max_supported_total_tokens")]
        return min(values) if values else None

    async def prefill(
        self, batch: generate_pb2.Batch
    ) -> tuple[list[generate_pb2.Generation], generate_pb2.CachedBatch | None]:
        replies = await self._all(lambda s: s.Prefill(generate_pb2.PrefillRequest(batch=batch)))
        return _generations(replies)

    async def decode(
        self, batches: list[generate_pb2.CachedBatch]
    ) -> tuple[list[generate_pb2.Generation], generate_pb2.CachedBatch | None]:
        replies = await self._all(lambda s: s.Decode(generate_pb2.DecodeRequest(batches=batches)))
        return _generations(replies)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> generate_pb2.CachedBatch:
        request = generate_pb2.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        return (await self._all(lambda s: s.FilterBatch(request)))[0].batch

    async def download_adapter(self, spec: AdapterSpec) -> float:
        """Download on shard 0 only (the shards share a disk); returns the adapter's memory fraction."""
        request = generate_pb2.DownloadAdapterRequest(
            adapter_parameters=adapter_parameters(spec), adapter_source=adapter_source(spec), api_token=spec.api_token
        )
        reply = await _call(self._stubs[0].DownloadAdapter(request))
        self._note_memory([reply.memory], disk_only=True)
        return reply.memory_fraction

    async def load_adapter(self, spec: AdapterSpec, index: int) -> None:
        request = generate_pb2.LoadAdapterRequest(
            adapter_parameters=adapter_parameters(spec),
            adapter_source=adapter_source(spec),
            adapter_index=index,
            api_token=spec.api_token,
        )
        self._note_memory([reply.memory for reply in await self._all(lambda s: s.LoadAdapter(request))])

    async def offload_adapter(self, spec: AdapterSpec, index: int) -> None:
        request = generate_pb2.OffloadAdapterRequest(
            adapter_parameters=adapter_parameters(spec), adapter_source=adapter_source(spec), adapter_index=index
        )
        self._note_memory([reply.memory for reply in await self._all(lambda s: s.OffloadAdapter(request))])

    def _note_memory(self, reports: list[generate_pb2.AdapterMemory], disk_only: bool = False) -> None:
        """Keep the latest adapter tier report: device and host summed over shards, disk from shard 0 (one disk)."""
        first = reports[0]
        self.adapter_memory["disk"] = (first.disk_adapters, first.disk_bytes)
        if not disk_only:
            self.adapter_memory["device"] = (first.device_adapters, sum(r.device_bytes for r in reports))
            self.adapter_memory["device_pool"] = (first.device_adapters, sum(r.device_pool_bytes for r in reports))
            self.adapter_memory["host"] = (first.host_adapters, sum(r.host_bytes for r in reports))


def _generations(replies: list) -> tuple[list[generate_pb2.Generation], generate_pb2.CachedBatch | None]:
    generations = [g for reply in replies for g in reply.generations]
    first = replies[0]
    return generations, (first.batch if first.HasField("batch") else None)
