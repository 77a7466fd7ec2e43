"""One generation step for a batch: forward, choose tokens, stop, detokenize, report Generations.

Everything per token is tensor work over the whole batch; the only per-request Python is turning results into
protobuf messages and the text bookkeeping that strings require. What decides the shape of a step's work (lengths,
which rows sample, which adapters run) is known on the host, so a decode step reads the device back once: its
results (requests asking for alternatives, prompt logprobs or a JSON schema add their own small transfers).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorax_server.adapters.registry import AdapterRegistry
from lorax_server.batch import Batch, RequestState
from lorax_server.dist import Parallel
from lorax_server.kv_cache import BLOCK_SIZE, KVCache
from lorax_server.layers.attention import build_metadata
from lorax_server.memory import NotEnoughMemory, PeakTracker, device_memory, plan_kv_tokens
from lorax_server.pb import generate_pb2
from lorax_server.sampling import Watermark, choose
from lorax_server.structured import Grammars
from lorax_server.uploads import upload

if TYPE_CHECKING:
    from lorax_server.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

FINISH_LENGTH = generate_pb2.FINISH_REASON_LENGTH
FINISH_EOS = generate_pb2.FINISH_REASON_EOS_TOKEN
FINISH_STOP = generate_pb2.FINISH_REASON_STOP_SEQUENCE


def eos_token_ids(folder: Path, tokenizer) -> list[int]:
    """The tokenizer's EOS plus every id listed by generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(folder) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


class Generator:
    """Owns the model, its KV cache and the tokenizer of one shard."""

    def __init__(
        self, model, tokenizer, eos_ids: list[int], parallel: Parallel, device: torch.device, adapters: AdapterRegistry,
        graphs: DecodeGraphs | None = None,
    ):
        """graphs: with --compile on CUDA, the runner that replays decode steps from CUDA graphs."""
        self.model, self.tokenizer, self.parallel, self.device = model, tokenizer, parallel, device
        self.graphs = graphs
        self.adapters = adapters
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.int64, device=device)
        self.special_ids = set(tokenizer.all_special_ids)
        self.vocab = model.cfg.vocab_size
        self.limits = (self.vocab, model.cfg.max_position_embeddings)  # what a batch's ids and lengths must fit
        self.watermark = Watermark.from_env()
        self.grammars = Grammars(tokenizer, self.vocab, eos_ids)
        self.cache: KVCache | None = None

    # ---- cache sizing -------------------------------------------------------------------------------
    def allocate_cache(self, tokens: int) -> int:
        """(Re)allocate the KV cache for `tokens` tokens (rounded down to whole blocks)."""
        blocks = max(tokens // BLOCK_SIZE, 1)
        self.cache = None
        self.cache = KVCache(
            self.model.cfg.num_layers, blocks, self.model.num_kv_heads, self.model.cfg.head_dim, self.model.dtype,
            self.device, scratch=self.graphs is not None,
        )
        return blocks * BLOCK_SIZE

    def warmup(self, pb_batch: generate_pb2.Batch, needed_tokens: int = 0) -> int:
        """Plan memory as the reference does and return the KV capacity in tokens: note what the weights left free,
        run the router's largest prefill (with a cache just big enough for it) and measure its peak, then size the
        cache from what is left after that peak and the adapter reservation (`memory.py`). `needed_tokens` is the
        least the cache must hold (the prefill budget, one request of --max-total-tokens); less is a start-up
        error that names --max-batch-prefill-tokens, as is running out of memory during the warm-up itself."""
        memory = device_memory(self.device)
        self.cache = None
        prompts = [len(r.tokenized_inputs.ids) or len(self.tokenizer(r.inputs)["input_ids"]) for r in pb_batch.requests]
        prompts = [min(n, r.truncate) if r.truncate else n for n, r in zip(prompts, pb_batch.requests)]
        prefill_tokens = sum(prompts)
        warm_tokens = sum(KVCache.blocks_for(n + 2) for n in prompts) * BLOCK_SIZE
        self.allocate_cache(warm_tokens)
        batch = None
        try:
            with PeakTracker(self.device) as tracker:
                batch = Batch.from_pb(
                    pb_batch, self.tokenizer, self.cache, self.device, self.grammars, self.limits, max_new_override=2
                )
                _, batch = self.prefill(batch)
                if batch is not None:
                    _, batch = self.decode([batch])
        except torch.OutOfMemoryError as exc:
            raise NotEnoughMemory(prefill_tokens, "out of memory while running it") from exc
        finally:
            if batch is not None:
                batch.release(self.cache)
            self.cache = None
        tokens = plan_kv_tokens(
            memory, tracker.peak, self.adapters.pools.budget, self.model.kv_bytes_per_token,
            max(needed_tokens, warm_tokens), prefill_tokens, self.device,
        )
        logger.info(
            "memory plan: %d MiB free after loading, warm-up of %d prefill tokens peaked at %d MiB, %d MiB reserved for "
            "adapters: KV cache of %d tokens", memory.free >> 20, prefill_tokens, tracker.peak >> 20,
            self.adapters.pools.budget >> 20, tokens,
        )
        capacity = self.allocate_cache(tokens)
        if self.graphs is not None:  # graphs serve the cache requests will use, not the warm-up's
            self.graphs.arm(self.cache)
        return capacity

    def new_batch(self, pb_batch: generate_pb2.Batch) -> Batch:
        if self.cache is None:  # no warm-up ran (tests, tools): plan without a measured peak
            memory = device_memory(self.device)
            per_token = self.model.kv_bytes_per_token
            self.allocate_cache(plan_kv_tokens(memory, 0, self.adapters.pools.budget, per_token, BLOCK_SIZE, 0, self.device))
        return Batch.from_pb(pb_batch, self.tokenizer, self.cache, self.device, self.grammars, self.limits)

    # ---- steps --------------------------------------------------------------------------------------
    def prefill(self, batch: Batch) -> tuple[list[generate_pb2.Generation], Batch | None]:
        """Run every prompt of a new batch through the model and choose each request's first token."""
        prompt_lens = [r.prompt_len for r in batch.requests]
        lens = upload(prompt_lens, torch.int64, self.device)
        input_ids = upload([t for r in batch.requests for t in r.ids], torch.int64, self.device)
        ends = torch.cumsum(lens, 0) - 1
        # Rows whose logits we need: the last prompt token, or every prompt token for prompt logprobs.
        rows, last_row, prompt_rows = [], [], {}
        start = 0
        for i, r in enumerate(batch.requests):
            if r.prefill_logprobs:
                prompt_rows[i] = len(rows)
                rows.extend(range(start, start + r.prompt_len))
            else:
                rows.append(start + r.prompt_len - 1)
            last_row.append(len(rows) - 1)
            start += r.prompt_len
        logit_rows = upload(rows, torch.int64, self.device) if prompt_rows else ends
        longest = max(prompt_lens)
        meta = build_metadata(lens, lens, batch.block_tables, BLOCK_SIZE, self.model.cfg.sliding_window, longest, longest)
        lora = self.adapters.lora_batch(batch.adapter_indices, batch.adapters, (lens, sum(prompt_lens)))
        logits = self.model.forward(input_ids, meta, self.cache.tensor, logit_rows, lora)
        batch.kv_lens, batch.max_kv = lens, longest
        batch.next_ids = input_ids[ends]  # each prompt's last token: what the watermark keys the first choice on
        if batch.sampling.needs_counts:
            batch.counts = batch.token_counts(self.vocab)
        prompt_details = {}
        if prompt_rows:
            all_logprobs = logits.log_softmax(-1)
            for i, first in prompt_rows.items():
                prompt_details[i] = self._prompt_tokens(batch.requests[i], all_logprobs[first : first + batch.requests[i].prompt_len])
            logits = logits[upload(last_row, torch.int64, self.device)]
        return self._advance(batch, logits, prompt_details)

    def decode(self, batches: list[Batch]) -> tuple[list[generate_pb2.Generation], Batch | None]:
        """One token for every live request of the given batches, run as one forward (with --compile on CUDA, replayed
        from a CUDA graph where `cuda_graphs.py` can)."""
        batch = Batch.concatenate(batches, self.vocab)
        live = [i for i, r in enumerate(batch.requests) if not r.finished]
        if len(live) < len(batch.requests):
            batch = batch.select(live, self.cache)
        if not batch.requests:
            return [], None
        kv_lens = batch.kv_lens + 1
        logits = None if self.graphs is None else self.graphs.decode(batch, kv_lens, self.cache)
        if logits is None:
            window = self.model.cfg.sliding_window
            meta = build_metadata(
                torch.ones_like(kv_lens), kv_lens, batch.block_tables, BLOCK_SIZE, window, 1, batch.max_kv + 1
            )
            lora = self.adapters.lora_batch(batch.adapter_indices, batch.adapters, None)
            rows = torch.arange(len(batch.requests), device=self.device)
            logits = self.model.forward(batch.next_ids, meta, self.cache.tensor, rows, lora)
        batch.kv_lens = kv_lens
        batch.max_kv += 1
        return self._advance(batch, logits, {})

    def _advance(self, batch: Batch, logits: torch.Tensor, prompt_details: dict) -> tuple[list, Batch | None]:
        """Choose tokens from last-position logits, apply stopping criteria, build Generations."""
        constrained = [(i, r.constraint) for i, r in enumerate(batch.requests) if r.constraint is not None]
        failed = {i: why for i, c in constrained if (why := c.failure()) is not None}  # they end alone, below
        constrained = [(i, c) for i, c in constrained if i not in failed]
        allowed = None
        if constrained:  # host-side mask work; on a GPU it overlaps the forward still in flight
            rows = upload([i for i, _ in constrained], torch.int64, self.device)
            allowed = rows, self.grammars.allowed([c for _, c in constrained], logits.shape[-1], self.device)
        next_ids, logprobs, all_logprobs = choose(
            logits, batch.sampling, batch.generated, batch.counts, batch.kv_lens,
            prev_ids=batch.next_ids, watermark=self.watermark, allowed=allowed,
        )
        batch.generated += 1
        batch.next_ids = next_ids
        if batch.counts is not None:
            batch.counts[torch.arange(len(batch.requests)), next_ids] += 1
        by_length = batch.generated >= batch.max_new_tokens
        by_eos = torch.isin(next_ids, self.eos_ids) & ~batch.ignore_eos & ~by_length

        # The step's one read-back: ids, their logprobs and both stopping flags in a single transfer (float64 holds
        # every token id exactly).
        results = torch.stack([next_ids.double(), logprobs.double(), by_length.double(), by_eos.double()]).tolist()
        ids_list, logprob_list = [int(t) for t in results[0]], results[1]
        length_list, eos_list = results[2], results[3]
        self.grammars.advance([c for _, c in constrained], [ids_list[i] for i, _ in constrained])
        texts = self._incremental_texts(batch.requests, ids_list)
        alternatives = self._alternatives(batch.requests, all_logprobs)
        generations = []
        for i, r in enumerate(batch.requests):
            if i in failed:
                r.finished = True
                if self.parallel.rank == 0:
                    generations.append(generate_pb2.Generation(request_id=r.id, error=failed[i]))
                continue
            token = ids_list[i]
            r.ids.append(token)
            r.generated_ids.append(token)
            r.text += texts[i]
            reason = FINISH_LENGTH if length_list[i] else FINISH_EOS if eos_list[i] else None
            if reason is None and r.stop_sequences and any(r.text.endswith(s) for s in r.stop_sequences):
                reason = FINISH_STOP
            r.finished = reason is not None
            if self.parallel.rank != 0:
                continue
            generation = generate_pb2.Generation(
                request_id=r.id,
                next_tokens=generate_pb2.NextTokens(
                    ids=[token], logprobs=[logprob_list[i]], texts=[texts[i]], is_special=[token in self.special_ids],
                    alternative_tokens=alternatives.get(i, []),
                ),
            )
            if i in prompt_details:
                generation.prefill_tokens.CopyFrom(prompt_details[i])
                generation.prefill_tokens_length = r.prompt_len
            if r.finished:
                generation.generated_text.CopyFrom(self._generated_text(batch, i, reason))
            generations.append(generation)
        if all(r.finished for r in batch.requests):
            batch.release(self.cache)
            return generations, None
        return generations, batch

    def _generated_text(self, batch: Batch, row: int, reason: int) -> generate_pb2.GeneratedText:
        r = batch.requests[row]
        out = generate_pb2.GeneratedText(
            text=self.tokenizer.decode(r.generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
            generated_tokens=len(r.generated_ids),
            finish_reason=reason,
        )
        seed = batch.sampling.seed_of(row)
        if seed is not None:
            out.seed = seed
        return out

    def _incremental_texts(self, requests: list[RequestState], new_ids: list[int]) -> list[str]:
        """Text each new token adds, decoding a short window so multi-byte characters come out whole."""
        windows = [r.ids[r.prefix_offset : r.read_offset] for r in requests]
        extended = [r.ids[r.prefix_offset :] + [t] for r, t in zip(requests, new_ids)]  # held-back tokens too
        before = self.tokenizer.batch_decode(windows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        after = self.tokenizer.batch_decode(extended, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts = []
        for r, prev, full in zip(requests, before, after):
            if len(full) > len(prev) and not full.endswith("\ufffd"):
                texts.append(full[len(prev) :])
                r.prefix_offset = r.read_offset
                r.read_offset = len(r.ids) + 1
            else:
                texts.append("")
        return texts

    def _alternatives(self, requests: list[RequestState], logprobs: torch.Tensor) -> dict[int, list]:
        """Top-k alternatives for the requests that asked for them."""
        out = {}
        for i, r in enumerate(requests):
            if r.return_k_alternatives > 0:
                values, ids = logprobs[i].topk(min(r.return_k_alternatives, logprobs.shape[-1]))
                ids_list = ids.tolist()
                out[i] = [
                    generate_pb2.AlternativeTokens(
                        ids=ids_list, logprobs=values.tolist(), texts=self.tokenizer.batch_decode([[t] for t in ids_list])
                    )
                ]
        return out

    def _prompt_tokens(self, r: RequestState, logprobs: torch.Tensor) -> generate_pb2.NextTokens:
        """Prompt tokens with the logprob of each given the ones before it (the first has none: NaN)."""
        prompt = r.ids[: r.prompt_len]
        ids = torch.tensor(prompt[1:], dtype=torch.int64, device=logprobs.device)
        values = [math.nan] + logprobs[:-1].gather(-1, ids[:, None]).squeeze(-1).tolist()
        return generate_pb2.NextTokens(
            ids=prompt, logprobs=values, texts=self.tokenizer.batch_decode([[t] for t in prompt]),
            is_special=[t in self.special_ids for t in prompt],
        )
