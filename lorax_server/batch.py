"""A live batch on a shard: per-request bookkeeping plus the flat tensors the next forward needs.

Prompts are never padded: the KV cache is addressed through each request's block table. Blocks for a
request's whole lifetime (prompt + max_new_tokens) are reserved when it joins and freed when it leaves, so a
running request can never run out of cache mid-generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorax_server.kv_cache import BLOCK_SIZE, KVCache
from lorax_server.pb import generate_pb2
from lorax_server.sampling import SamplingParams
from lorax_server.uploads import upload
from lorax_server.structured import Constraint, Grammars


@dataclass
class RequestState:
    """What a shard remembers about one request between steps."""

    id: int
    ids: list[int]  # prompt followed by generated tokens
    prompt_len: int
    max_new_tokens: int
    stop_sequences: list[str]
    prefill_logprobs: bool
    return_k_alternatives: int
    adapter_index: int
    blocks: list[int]
    prefix_offset: int = 0  # incremental detokenization window
    read_offset: int = 0
    text: str = ""  # decoded output so far, for stop sequences
    finished: bool = False
    generated_ids: list[int] = field(default_factory=list)
    constraint: Constraint | None = None  # JSON-schema state, when the request has a `response_format`

    @property
    def kv_len(self) -> int:
        """Tokens in the cache: all but the newest generated token, which the next decode step writes."""
        return len(self.ids) - 1 if self.generated_ids else 0


@dataclass
class Batch:
    id: int
    requests: list[RequestState]
    block_tables: torch.Tensor  # [B, max_blocks] (padding 0)
    kv_lens: torch.Tensor  # [B] tokens currently in the cache
    next_ids: torch.Tensor  # [B] token each request feeds to the next decode step
    generated: torch.Tensor  # [B] tokens generated so far
    max_new_tokens: torch.Tensor  # [B]
    ignore_eos: torch.Tensor  # [B] bool
    adapter_indices: torch.Tensor  # [B]
    sampling: SamplingParams
    counts: torch.Tensor | None = None  # [B, vocab] token counts, only when a request uses penalties
    max_kv: int = 0  # the longest request's tokens in the cache: known on the host, so steps never read kv_lens back

    @property
    def adapters(self) -> frozenset[int]:
        """The router adapter indices the batch's requests use (host side)."""
        return frozenset(r.adapter_index for r in self.requests)

    @property
    def max_tokens(self) -> int:
        """KV tokens reserved by the batch (what the router budgets against)."""
        return sum(len(r.blocks) for r in self.requests) * BLOCK_SIZE

    def to_pb(self) -> generate_pb2.CachedBatch:
        live = [r for r in self.requests if not r.finished]
        return generate_pb2.CachedBatch(
            id=self.id,
            request_ids=[r.id for r in self.requests],
            size=len(self.requests),
            max_tokens=self.max_tokens,
            current_tokens=len(live),
        )

    @classmethod
    def from_pb(
        cls,
        pb: generate_pb2.Batch,
        tokenizer,
        cache: KVCache,
        device: torch.device,
        grammars: Grammars,
        limits: tuple[int, int],
        max_new_override: int | None = None,
    ) -> "Batch":
        """Build a batch from the router's requests, reserving their KV blocks and starting the compilation of
        their JSON schemas.

        Token ids come from the router when it tokenized the inputs; otherwise the shard tokenizes.
        Each request keeps only its last `truncate` prompt tokens. `limits` is (vocabulary size, positions): an id
        outside the vocabulary, or a prompt plus its new tokens beyond the model's positions, fails the batch here
        with the reason (on a GPU it would be a device-side assert that breaks every later request).
        """
        vocab, positions = limits
        prompts = []
        for r in pb.requests:
            ids = list(r.tokenized_inputs.ids) if r.tokenized_inputs.ids else tokenizer(r.inputs)["input_ids"]
            if r.truncate and len(ids) > r.truncate:
                ids = ids[-r.truncate :]
            if not ids:
                raise ValueError(f"request {r.id} has an empty prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"request {r.id} has token ids outside the vocabulary (0..{vocab - 1})")
            if len(ids) + r.stopping_parameters.max_new_tokens > positions:
                raise ValueError(
                    f"request {r.id}: {len(ids)} prompt tokens + {r.stopping_parameters.max_new_tokens} new tokens exceed "
                    f"the model's {positions} positions (max_position_embeddings); lower --max-total-tokens"
                )
            prompts.append(ids)
        max_new = [max_new_override or r.stopping_parameters.max_new_tokens or 1 for r in pb.requests]
        blocks = cache.allocate([len(ids) + n for ids, n in zip(prompts, max_new)])
        requests = [
            RequestState(
                id=r.id,
                ids=ids,
                prompt_len=len(ids),
                max_new_tokens=n,
                stop_sequences=list(r.stopping_parameters.stop_sequences),
                prefill_logprobs=r.prefill_logprobs,
                return_k_alternatives=r.parameters.return_k_alternatives,
                adapter_index=r.adapter_index,
                blocks=b,
                prefix_offset=max(len(ids) - 5, 0),
                read_offset=len(ids),
                constraint=grammars.constraint(r.parameters.schema) if r.parameters.schema else None,
            )
            for r, ids, n, b in zip(pb.requests, prompts, max_new, blocks)
        ]
        width = max(len(b) for b in blocks)
        table = upload([b + [0] * (width - len(b)) for b in blocks], torch.int64, device)
        size = len(requests)
        return cls(
            id=pb.id,
            requests=requests,
            block_tables=table,
            kv_lens=torch.zeros(size, dtype=torch.int64, device=device),
            next_ids=torch.zeros(size, dtype=torch.int64, device=device),
            generated=torch.zeros(size, dtype=torch.int64, device=device),
            max_new_tokens=upload(max_new, torch.int64, device),
            ignore_eos=upload([r.stopping_parameters.ignore_eos_token for r in pb.requests], torch.bool, device),
            adapter_indices=upload([r.adapter_index for r in pb.requests], torch.int64, device),
            sampling=SamplingParams.from_pb([r.parameters for r in pb.requests], device),
        )

    def select(self, rows: list[int], cache: KVCache) -> "Batch":
        """A batch of the given rows; the blocks of every other request go back to the cache."""
        keep = set(rows)
        for i, r in enumerate(self.requests):
            if i not in keep:
                cache.free(r.blocks)
        index = upload(rows, torch.int64, self.kv_lens.device)
        requests = [self.requests[i] for i in rows]
        width = max(len(r.blocks) for r in requests)
        return Batch(
            id=self.id,
            requests=requests,
            block_tables=self.block_tables[index, :width],
            kv_lens=self.kv_lens[index],
            next_ids=self.next_ids[index],
            generated=self.generated[index],
            max_new_tokens=self.max_new_tokens[index],
            ignore_eos=self.ignore_eos[index],
            adapter_indices=self.adapter_indices[index],
            sampling=self.sampling.select(rows, index),
            counts=None if self.counts is None else self.counts[index],
            max_kv=max(r.kv_len for r in requests),
        )

    def filter(self, request_ids: list[int], cache: KVCache) -> "Batch":
        """Keep only `request_ids` (the router's view of who is still running)."""
        wanted = set(request_ids)
        rows = [i for i, r in enumerate(self.requests) if r.id in wanted]
        if not rows:
            raise ValueError(f"FilterBatch on batch {self.id} would leave no request")
        return self.select(rows, cache)

    def release(self, cache: KVCache) -> None:
        for r in self.requests:
            cache.free(r.blocks)
        self.requests = []

    @classmethod
    def concatenate(cls, batches: list["Batch"], vocab: int) -> "Batch":
        """One batch running every request of `batches` (the first batch's id is kept)."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.block_tables.shape[1] for b in batches)
        tables = [torch.nn.functional.pad(b.block_tables, (0, width - b.block_tables.shape[1])) for b in batches]
        counts = None
        if any(b.counts is not None for b in batches):
            counts = torch.cat([b.counts if b.counts is not None else b.token_counts(vocab) for b in batches])
        return cls(
            id=batches[0].id,
            requests=[r for b in batches for r in b.requests],
            block_tables=torch.cat(tables),
            kv_lens=torch.cat([b.kv_lens for b in batches]),
            next_ids=torch.cat([b.next_ids for b in batches]),
            generated=torch.cat([b.generated for b in batches]),
            max_new_tokens=torch.cat([b.max_new_tokens for b in batches]),
            ignore_eos=torch.cat([b.ignore_eos for b in batches]),
            adapter_indices=torch.cat([b.adapter_indices for b in batches]),
            sampling=SamplingParams.cat([b.sampling for b in batches]),
            counts=counts,
            max_kv=max(b.max_kv for b in batches),
        )

    def token_counts(self, vocab: int) -> torch.Tensor:
        """[B, vocab] occurrences of each token in each request's sequence so far."""
        device = self.kv_lens.device
        counts = torch.zeros(len(self.requests), vocab, dtype=torch.int32, device=device)
        rows = torch.cat([torch.full((len(r.ids),), i, device=device) for i, r in enumerate(self.requests)])
        cols = torch.tensor([t for r in self.requests for t in r.ids], dtype=torch.int64, device=device)
        counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.int32), accumulate=True)
        return counts
