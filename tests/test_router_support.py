"""Router test support: a tiny word-level tokenizer, and an in-process fake shard speaking the real gRPC protocol
over a unix socket, plus the whole router wired on top of it (`router_stack`).

The fake shard
follows the shard contract the router relies on: KV tokens reserved per request (input + max_new_tokens, in blocks
of 16) and refused with RESOURCE_EXHAUSTED beyond `capacity`; finished requests stay in a batch until FilterBatch;
only rank 0 returns generations; adapters must be loaded before their requests are prefilled. Tokens are
deterministic: step k of a request yields id `3 + (sum(input ids) + k [+ seed when sampling]) % 50`, text `<id>`.
Magic inputs: "FAIL" fails Prefill, "DECODEFAIL" fails Decode, "EOS" finishes with EOS after two tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
from dataclasses import dataclass, field

import grpc
import httpx
from tokenizers import Tokenizer, models, pre_tokenizers

from lorax_server.pb import generate_pb2, generate_pb2_grpc
from router.main import Router, build_router, parse_args
from router.shards import ShardedClient
from router.validation import BASE_MODEL_ID, AdapterSpec, ValidRequest

BLOCK = 16


def token_id(request: generate_pb2.Request, step: int) -> int:
    seed = request.parameters.seed if request.parameters.do_sample else 0
    return 3 + (sum(request.tokenized_inputs.ids) + step + seed) % 50


def word_tokenizer() -> Tokenizer:
    """Whitespace-separated words `w0`..`w199` (anything else is [UNK]=0): n words are n tokens, id of wK is K+1."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(200)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{start + i}" for i in range(n))


def make_request(input_length: int, max_new_tokens: int, adapter: str = BASE_MODEL_ID) -> ValidRequest:
    """A validated request without going through validation (for scheduling tests)."""
    return ValidRequest(
        inputs=words(input_length),
        input_ids=tuple(range(1, input_length + 1)),
        parameters=generate_pb2.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0),
        stopping=generate_pb2.StoppingCriteriaParameters(max_new_tokens=max_new_tokens),
        adapter=AdapterSpec(ids=(adapter,)),
        details=False,
        decoder_input_details=False,
        return_full_text=False,
        best_of=1,
    )


@dataclass
class _Req:
    pb: generate_pb2.Request
    reserved: int
    generated: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Batch:
    id: int
    requests: dict[int, _Req]

    def cached(self) -> generate_pb2.CachedBatch:
        return generate_pb2.CachedBatch(
            id=self.id,
            request_ids=list(self.requests),
            size=len(self.requests),
            max_tokens=sum(r.reserved for r in self.requests.values()),
            current_tokens=len(self.requests),
        )


class FakeShard(generate_pb2_grpc.LoraxServiceServicer):
    def __init__(self, rank: int = 0, urls: list[str] | None = None, capacity: int = 4096, step_delay: float = 0.0):
        self.rank = rank
        self.urls = urls or []
        self.capacity = capacity
        self.step_delay = step_delay
        self.batches: dict[int, _Batch] = {}
        self.healthy = True
        self.health_calls = 0
        # adapters
        self.download_delay: dict[str, float] = {}
        self.download_error: dict[str, str] = {}
        self.adapter_cost: dict[str, float] = {}
        self.loaded: set[int] = set()
        self.max_loaded = 0
        self.adapter_calls: list[tuple[str, str]] = []
        # observations
        self.prefill_batches: list[list[generate_pb2.Request]] = []
        self.decode_calls: list[list[int]] = []
        self.filter_calls: list[tuple[int, list[int]]] = []
        self.cleared: list[int | None] = []
        self.warmup_requests: list[generate_pb2.WarmupRequest] = []
        self.log: list[tuple[str, list[int]]] = []  # ("prefill", request ids) / ("decode", batch ids)
        self.peak_reserved = 0

    @property
    def reserved(self) -> int:
        return sum(r.reserved for b in self.batches.values() for r in b.requests.values())

    async def Info(self, request, context):
        return generate_pb2.InfoResponse(
            dtype="torch.float32", device_type="cpu", block_size=BLOCK, supports_generation=True
        )

    async def Health(self, request, context):
        self.health_calls += 1
        if not self.healthy:
            await context.abort(grpc.StatusCode.INTERNAL, "unhealthy shard")
        return generate_pb2.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        return generate_pb2.ServiceDiscoveryResponse(urls=self.urls)

    async def ClearCache(self, request, context):
        if request.HasField("id"):
            self.batches.pop(request.id, None)
            self.cleared.append(request.id)
        else:
            self.batches.clear()
            self.cleared.append(None)
        return generate_pb2.ClearCacheResponse()

    async def Warmup(self, request, context):
        self.warmup_requests.append(request)
        return generate_pb2.WarmupResponse(max_supported_total_tokens=self.capacity)

    def _step(self, batch: _Batch, first: bool) -> list[generate_pb2.Generation]:
        generations = []
        for rid, r in batch.requests.items():
            if r.finished:
                continue
            ids = r.pb.tokenized_inputs.ids
            if "BADSCHEMA" in r.pb.inputs:  # a request whose own input fails on the shard
                r.finished = True
                generations.append(generate_pb2.Generation(request_id=rid, error="invalid JSON schema: no"))
                continue
            tid = token_id(r.pb, len(r.generated))
            r.generated.append(tid)
            g = generate_pb2.Generation(
                request_id=rid,
                next_tokens=generate_pb2.NextTokens(
                    ids=[tid], logprobs=[-0.1 * (tid % 7)], texts=[f"<{tid}>"], is_special=[False]
                ),
            )
            k = r.pb.parameters.return_k_alternatives
            if k:
                alternatives = list(range(tid, tid + k))
                g.next_tokens.alternative_tokens.add(
                    ids=alternatives, logprobs=[-1.0] * k, texts=[f"<{a}>" for a in alternatives]
                )
            if first and r.pb.prefill_logprobs:
                g.prefill_tokens.CopyFrom(
                    generate_pb2.NextTokens(
                        ids=ids,
                        logprobs=[math.nan] + [-1.0] * (len(ids) - 1),
                        texts=[f"[{i}]" for i in ids],
                        is_special=[False] * len(ids),
                    )
                )
                g.prefill_tokens_length = len(ids)
            eos = "EOS" in r.pb.inputs and len(r.generated) == 2
            if eos or len(r.generated) >= r.pb.stopping_parameters.max_new_tokens:
                r.finished = True
                g.generated_text.CopyFrom(
                    generate_pb2.GeneratedText(
                        text="".join(f"<{t}>" for t in r.generated),
                        generated_tokens=len(r.generated),
                        finish_reason=generate_pb2.FINISH_REASON_EOS_TOKEN if eos else generate_pb2.FINISH_REASON_LENGTH,
                    )
                )
                if r.pb.parameters.do_sample:
                    g.generated_text.seed = r.pb.parameters.seed
            if self.rank == 0:
                generations.append(g)
        return generations

    async def Prefill(self, request, context):
        await asyncio.sleep(self.step_delay)
        requests = list(request.batch.requests)
        self.prefill_batches.append(requests)
        for r in requests:
            if "FAIL" in r.inputs and "DECODEFAIL" not in r.inputs:
                await context.abort(grpc.StatusCode.INTERNAL, f"boom on request {r.id}")
            if r.adapter_index != 0 and r.adapter_index not in self.loaded:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter {r.adapter_index} not loaded")
        reserved = [-(-(len(r.tokenized_inputs.ids) + r.stopping_parameters.max_new_tokens) // BLOCK) * BLOCK for r in requests]
        if self.reserved + sum(reserved) > self.capacity:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of KV blocks")
        batch = _Batch(request.batch.id, {r.id: _Req(r, n) for r, n in zip(requests, reserved)})
        self.log.append(("prefill", [r.id for r in requests]))
        self.peak_reserved = max(self.peak_reserved, self.reserved + sum(reserved))
        generations = self._step(batch, first=True)
        response = generate_pb2.PrefillResponse(generations=generations)
        if all(r.finished for r in batch.requests.values()):
            return response
        self.batches[batch.id] = batch
        response.batch.CopyFrom(batch.cached())
        return response

    async def Decode(self, request, context):
        await asyncio.sleep(self.step_delay)
        ids = [b.id for b in request.batches]
        self.decode_calls.append(ids)
        self.log.append(("decode", ids))
        missing = [i for i in ids if i not in self.batches]
        if missing:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {missing[0]} not found")
        parts = [self.batches.pop(i) for i in ids]
        batch = _Batch(ids[0], {rid: r for part in parts for rid, r in part.requests.items()})
        if any("DECODEFAIL" in r.pb.inputs for r in batch.requests.values()):
            await context.abort(grpc.StatusCode.INTERNAL, "decode exploded")
        generations = self._step(batch, first=False)
        response = generate_pb2.DecodeResponse(generations=generations)
        if all(r.finished for r in batch.requests.values()):
            return response
        self.batches[batch.id] = batch
        response.batch.CopyFrom(batch.cached())
        return response

    async def FilterBatch(self, request, context):
        self.filter_calls.append((request.batch_id, list(request.request_ids)))
        batch = self.batches[request.batch_id]
        batch.requests = {rid: batch.requests[rid] for rid in request.request_ids}
        return generate_pb2.FilterBatchResponse(batch=batch.cached())

    def _adapter(self, request) -> str:
        return ",".join(request.adapter_parameters.adapter_ids)

    async def DownloadAdapter(self, request, context):
        name = self._adapter(request)
        self.adapter_calls.append(("download", name))
        await asyncio.sleep(self.download_delay.get(name, 0.0))
        if name in self.download_error:
            await context.abort(grpc.StatusCode.INTERNAL, self.download_error[name])
        return generate_pb2.DownloadAdapterResponse(downloaded=True, memory_fraction=self.adapter_cost.get(name, 0.1))

    async def LoadAdapter(self, request, context):
        self.adapter_calls.append(("load", self._adapter(request)))
        self.loaded.add(request.adapter_index)
        self.max_loaded = max(self.max_loaded, len(self.loaded))
        return generate_pb2.LoadAdapterResponse(loaded=True)

    async def OffloadAdapter(self, request, context):
        self.adapter_calls.append(("offload", self._adapter(request)))
        self.loaded.discard(request.adapter_index)
        return generate_pb2.OffloadAdapterResponse(offloaded=True)


@contextlib.asynccontextmanager
async def fake_shards(world_size: int = 1, **options):
    """Serve `world_size` fake shards on unix sockets; yields (shards, master socket path)."""
    base = tempfile.mkdtemp(prefix="lxr", dir="/tmp") + "/shard"
    urls = [f"unix://{base}-{rank}" for rank in range(world_size)]
    shards = [FakeShard(rank, urls, **options) for rank in range(world_size)]
    servers = []
    for shard, url in zip(shards, urls):
        server = grpc.aio.server()
        generate_pb2_grpc.add_LoraxServiceServicer_to_server(shard, server)
        server.add_insecure_port(url)
        await server.start()
        servers.append(server)
    try:
        yield shards, f"{base}-0"
    finally:
        await asyncio.gather(*(server.stop(None) for server in servers))


@dataclass
class Stack:
    http: httpx.AsyncClient
    shards: list[FakeShard]
    router: Router


@contextlib.asynccontextmanager
async def router_stack(*flags: str, world_size: int = 1, **options):
    """The real router (same wiring as `lorax-router`) over fake shards, reachable through an httpx client."""
    async with fake_shards(world_size, **options) as (shards, master):
        args = parse_args(["--tokenizer-name", "words", "--master-shard-uds-path", master, *flags])
        client = await ShardedClient.connect(master, timeout_s=5)
        router = await build_router(args, word_tokenizer(), client)
        router.start()
        try:
            transport = httpx.ASGITransport(app=router.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=30) as http:
                yield Stack(http, shards, router)
        finally:
            await router.stop()
            await client.close()


def run(coroutine, timeout: float = 60):
    """Run an async test body with a hard time limit, so a lost request fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))
