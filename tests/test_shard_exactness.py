"""Our shard's greedy tokens equal transformers' generate, for requests that share batches and join mid-decode."""
from __future__ import annotations

import pytest
import torch

from lorax_server.dist import Parallel
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from tests.tiny_models import ARCHS, make_model

PROMPTS = ["What is the capital", "Hello world", "The quick brown fox jumps", "LoRA adapters change"]
MAX_NEW = [10, 6, 8, 12]


def make_request(tokenizer, rid: int, prompt: str, max_new: int, **params) -> pb.Request:
    ids = tokenizer(prompt)["input_ids"]
    defaults = dict(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    defaults.update(params)
    return pb.Request(
        id=rid, inputs=prompt, tokenized_inputs=pb.TokenizedInputs(ids=ids), truncate=len(ids),
        parameters=pb.NextTokenChooserParameters(**defaults),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
    )


def run_staggered(generator, requests: list[pb.Request], join_after: int = 3) -> dict[int, list[int]]:
    """Prefill half the requests, decode a few steps, prefill the rest, then decode everything together,
    filtering finished requests out as the router does."""
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    half = len(requests) // 2

    def record(gens):
        for g in gens:
            out[g.request_id].extend(g.next_tokens.ids)
        return {g.request_id for g in gens if g.HasField("generated_text")}

    def prune(batch, done):
        if batch is None or not done:
            return batch
        keep = [r.id for r in batch.requests if r.id not in done]
        return batch.filter(keep, generator.cache) if keep else batch.release(generator.cache)

    gens, first = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=requests[:half])))
    first = prune(first, record(gens))
    for _ in range(join_after):
        if first is None:
            break
        gens, first = generator.decode([first])
        first = prune(first, record(gens))
    gens, second = generator.prefill(generator.new_batch(pb.Batch(id=1, requests=requests[half:])))
    second = prune(second, record(gens))
    running = [b for b in (first, second) if b is not None]
    while running:
        gens, batch = generator.decode(running)
        batch = prune(batch, record(gens))
        running = [batch] if batch is not None else []
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_with_mid_decode_joins(arch, tmp_path):
    model = make_model(arch, tmp_path)
    service = build_service(str(tmp_path), None, "hub", None, Parallel(), torch.device("cpu"), "/unused")
    generator = service.generator
    generator.allocate_cache(2048)
    tok = generator.tokenizer
    requests = [make_request(tok, i, p, n) for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))]
    ours = run_staggered(generator, requests)
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_NEW)):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
        assert ours[i] == ref, f"{arch} request {i}"
    assert generator.cache.free_blocks == generator.cache.num_blocks, "every block returns to the cache"
