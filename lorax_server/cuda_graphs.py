"""`--compile` on CUDA: decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches hundreds of small kernels; at small batch sizes the host's launch overhead, not the GPU,
sets the pace. A CUDA graph records the step's kernels once and replays them with one launch. A graph's inputs must
sit at fixed addresses with fixed shapes, so a step is padded to its bucket (1, 2, 4, ... up to
LORAX_COMPILE_MAX_BATCH_SIZE, default 128) and its inputs are copied into static tensors:

- padding rows feed token 0 with one key, in a cache block no request owns (`KVCache.scratch`), as the base model
  (slot -1); their logits are dropped;
- the block table is padded to the most blocks a request can hold, so the flash decode kernel gets a fixed `max_kv`
  and reads only each row's own `kv_lens` keys;
- LoRA runs every module whose pool holds rows (`LoraBatch.every_pool`): one graph serves any mix of adapters, tokens
  of the base model or of an adapter that does not target a module getting an exact zero delta.

Graphs are captured lazily, on the model thread, the first time a bucket is used after warm-up (`arm`), all in one
memory pool, and each is checked once against an eager forward of the same padded inputs: a mismatch or any capture
error is logged and decode stays eager from then on. They are dropped (and captured again when next used) when the
adapter pools or the KV cache are replaced, since a graph keeps the addresses of the tensors it was captured with.
Steps with more requests, or with an adapter of rank above LORAX_COMPILE_MAX_RANK (default 64), run eagerly, as do
prefill and every step on CPU. With `capture=False` the padded static step runs eagerly: that is how the CPU tests
check the padding.
"""
from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import torch

from lorax_server.adapters.registry import AdapterRegistry
from lorax_server.batch import Batch
from lorax_server.dist import Parallel
from lorax_server.kv_cache import BLOCK_SIZE, KVCache
from lorax_server.layers import flash_decode
from lorax_server.layers.attention import build_metadata
from lorax_server.layers.lora import LoraBatch
from lorax_server.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

MAX_BATCH_ENV, MAX_RANK_ENV = "LORAX_COMPILE_MAX_BATCH_SIZE", "LORAX_COMPILE_MAX_RANK"


def buckets(max_batch: int) -> list[int]:
    """The padded batch sizes: powers of two below `max_batch`, then `max_batch` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sizes + [max_batch] if max_batch > 1 else sizes


def unsupported(model, parallel: Parallel, device: torch.device) -> str | None:
    """Why decode on this model and device cannot be captured, or None. A graph needs a decode forward without any
    read-back to the host, which is the native decoder with the paged flash decode kernel; ALiBi and soft-capped
    layers take the masked attention paths and mixture-of-experts layers read their expert sizes back."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not isinstance(model, DecoderModel):
        return "the transformers-backed path is not captured"
    if parallel.world_size > 1:
        return "tensor-parallel collectives are not captured"
    cfg = model.cfg
    if cfg.alibi_slopes is not None:
        return "ALiBi layers take the masked decode attention"
    if cfg.attn_softcap is not None:
        return "soft-capped attention takes the masked decode attention"
    if cfg.moe is not None:
        return "mixture-of-experts layers read their expert sizes back to the host"
    if not flash_decode.supports(model.dtype, cfg.head_dim) or not flash_decode.usable(device):
        return f"the paged flash decode kernel does not serve {model.dtype} with head size {cfg.head_dim} here"
    return None


def from_env(model, adapters: AdapterRegistry, parallel: Parallel, device: torch.device) -> "DecodeGraphs | None":
    """The runner for `--compile`, sized by LORAX_COMPILE_MAX_BATCH_SIZE and LORAX_COMPILE_MAX_RANK; None (with the
    reason logged) where decode cannot be captured."""
    reason = unsupported(model, parallel, device)
    if reason is not None:
        logger.warning("--compile: decode runs eagerly (%s)", reason)
        return None
    max_batch, max_rank = int(os.environ.get(MAX_BATCH_ENV, "128")), int(os.environ.get(MAX_RANK_ENV, "64"))
    if max_batch < 1 or max_rank < 0:
        raise ValueError(f"{MAX_BATCH_ENV} must be at least 1 and {MAX_RANK_ENV} at least 0")
    logger.info("--compile: decode steps of up to %d requests with adapters of rank <= %d replay CUDA graphs "
                "(batch sizes %s, captured on first use)", max_batch, max_rank, buckets(max_batch))
    return DecodeGraphs(model, adapters, device, max_batch, max_rank)


@dataclass
class _Static:
    """The step's inputs at fixed addresses, [max_batch] rows; a bucket's graph reads the first `bucket` rows."""

    ids: torch.Tensor  # token each row feeds
    kv_lens: torch.Tensor  # keys each row holds after this step (padding: 1)
    table: torch.Tensor  # [max_batch, most blocks a request holds] block table (padding: the scratch block)
    slots: torch.Tensor  # adapter slot of each row (-1: the base model)
    scratch: int


class GraphMismatch(RuntimeError):
    """A replayed graph's logits differ from an eager forward of the same inputs."""


class DecodeGraphs:
    """Padded, static decode steps for one shard, replayed from a CUDA graph per bucket (see the module docstring)."""

    def __init__(
        self, model: DecoderModel, adapters: AdapterRegistry, device: torch.device, max_batch: int, max_rank: int,
        capture: bool = True,
    ):
        self.model, self.adapters, self.device = model, adapters, device
        self.max_batch, self.max_rank, self.capture = max_batch, max_rank, capture
        self.buckets = buckets(max_batch)
        self.failed: str | None = None  # why graphs were given up, once they were
        self._cache: weakref.ref[KVCache] | None = None  # the cache the static inputs and graphs serve
        self._static: _Static | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> graph, its logits
        self._pool = None
        self._version = adapters.pools.version

    def arm(self, cache: KVCache) -> None:
        """Serve decode steps against `cache` (which must have a scratch block) from now on: called once the cache
        that serves requests exists, after warm-up, so that the warm-up's own decode runs eagerly."""
        if cache.scratch is None:
            raise ValueError("CUDA-graph decode needs a KV cache with a scratch block")
        self._drop()
        width = min(KVCache.blocks_for(self.model.cfg.max_position_embeddings), cache.num_blocks)
        rows, device = self.max_batch, self.device
        self._static = _Static(
            ids=torch.zeros(rows, dtype=torch.int64, device=device),
            kv_lens=torch.ones(rows, dtype=torch.int64, device=device),
            table=torch.full((rows, width), cache.scratch, dtype=torch.int64, device=device),
            slots=torch.full((rows,), -1, dtype=torch.int64, device=device),
            scratch=cache.scratch,
        )
        self._cache = weakref.ref(cache)

    def captured(self) -> list[int]:
        """The buckets that hold a graph now."""
        return sorted(self._graphs)

    def decode(self, batch: Batch, kv_lens: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """Logits [B, vocab] of the batch's decode step (its requests then hold `kv_lens` keys), from its bucket's
        graph; None when the step must run eagerly (too many requests, an adapter of too high a rank, not armed for
        this cache, or graphs given up)."""
        size, static = len(batch.requests), self._static
        if self.failed or size > self.max_batch or self._cache is None or self._cache() is not cache:
            return None
        if batch.block_tables.shape[1] > static.table.shape[1]:
            return None
        used = batch.adapters
        pools = self.adapters.pools
        if any(pools.weights[i].rank > self.max_rank for i in used if i in pools.weights):
            return None
        lora = self.adapters.lora_batch(batch.adapter_indices, used, None)  # raises for an adapter not loaded
        if pools.version != self._version:  # the pools were replaced: graphs hold the old tensors' addresses
            self._drop()
            self._version = pools.version
        bucket = next(b for b in self.buckets if b >= size)
        self._stage(batch, kv_lens, lora, bucket)
        if not self.capture:
            return self._forward(bucket)[:size]
        if bucket not in self._graphs:
            try:
                self._graphs[bucket] = self._record(bucket)
            except Exception as exc:  # a capture this GPU or build cannot do must never stop the server
                self._give_up(f"capturing batch size {bucket} failed: {exc}")
                return None
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:size]

    def _stage(self, batch: Batch, kv_lens: torch.Tensor, lora: LoraBatch | None, bucket: int) -> None:
        """Copy the step's inputs into the static tensors; rows `size`..`bucket` become padding."""
        static, size, width = self._static, len(batch.requests), batch.block_tables.shape[1]
        static.ids[:size].copy_(batch.next_ids)
        static.kv_lens[:size].copy_(kv_lens)
        static.kv_lens[size:bucket].fill_(1)
        static.table[:bucket].fill_(static.scratch)
        static.table[:size, :width].copy_(batch.block_tables)
        static.slots[:bucket].fill_(-1)
        if lora is not None:
            static.slots[:size].copy_(lora.token_slots)

    def _forward(self, bucket: int) -> torch.Tensor:
        """Logits [bucket, vocab] of the padded step from the static tensors (what a graph records)."""
        static, cache = self._static, self._cache()
        kv_lens, table = static.kv_lens[:bucket], static.table[:bucket]
        meta = build_metadata(torch.ones_like(kv_lens), kv_lens, table, BLOCK_SIZE, self.model.cfg.sliding_window, 1,
                              table.shape[1] * BLOCK_SIZE)
        lora = LoraBatch.every_pool(self.adapters.pools, static.slots[:bucket])
        rows = torch.arange(bucket, device=self.device)
        return self.model.forward(static.ids[:bucket], meta, cache.tensor, rows, lora)

    def _record(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the bucket's step from the staged inputs and check one replay against an eager forward. Every run
        writes the same keys and values to the same slots, so the repeats leave the cache as one step would."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # first runs (Triton compiles, cuBLAS workspaces) stay out of the graph
            self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(bucket)
        graph.replay()
        expected = self._forward(bucket)
        error = (logits - expected).abs().max().item()
        if error > 0.02 * expected.abs().max().item() + 0.02:  # half-precision noise, not a wrong address
            raise GraphMismatch(f"replayed logits differ from eager ones by {error:.3g}")
        logger.info("--compile: captured the decode step for batch size %d", bucket)
        return graph, logits

    def _drop(self) -> None:
        """Forget every graph and its memory pool (captured again on next use)."""
        self._graphs.clear()
        self._pool = None

    def _give_up(self, reason: str) -> None:
        logger.warning("--compile: decode runs eagerly from now on (%s)", reason)
        self.failed = reason
        self._drop()
