"""Sampling and stopping on the shard: greedy, seeds, top-k/top-p, penalties, watermark, EOS, stop sequences,
logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from lorax_server.dist import Parallel
from lorax_server.kv_cache import KVCache, OutOfBlocks
from lorax_server.pb import generate_pb2 as pb
from lorax_server.sampling import (
    SamplingParams, Watermark, apply_penalties, apply_watermark, argmax_rows, choose, green_list, uniform_noise, warp,
)
from lorax_server.shard import build_service
from tests.test_shard_exactness import make_request


def params(**kw) -> pb.NextTokenChooserParameters:
    base = dict(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    base.update(kw)
    return pb.NextTokenChooserParameters(**base)


def test_sampling_decision_follows_parameters():
    p = SamplingParams.from_pb(
        [params(), params(do_sample=True), params(temperature=0.0, do_sample=True), params(top_k=5), params(temperature=0.7)],
        torch.device("cpu"),
    )
    assert p.flags.sample == (False, True, False, True, True)


def test_noise_is_deterministic_per_seed_and_step():
    seeds = torch.tensor([1, 1, 2, -5])
    steps = torch.tensor([0, 1, 0, 0])
    a, b = uniform_noise(seeds, steps, 1000), uniform_noise(seeds, steps, 1000)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert 0 < a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.02


def test_top_k_one_equals_greedy_and_top_p_keeps_most_likely():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams.from_pb([params(top_k=1, seed=s) for s in range(4)], torch.device("cpu"))
    ids, _, _ = choose(logits, p, torch.zeros(4, dtype=torch.int64), None, torch.ones(4))
    assert torch.equal(ids, logits.argmax(-1))
    p = SamplingParams.from_pb([params(top_p=0.01, seed=s) for s in range(4)], torch.device("cpu"))
    warped = warp(logits, p)
    assert torch.equal(torch.isfinite(warped).sum(-1), torch.ones(4, dtype=torch.int64))


def test_sampled_distribution_follows_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    p = SamplingParams.from_pb([params(do_sample=True, seed=s) for s in range(4000)], torch.device("cpu"))
    ids, _, _ = choose(logits, p, torch.zeros(4000, dtype=torch.int64), None, torch.ones(4000))
    freq = torch.bincount(ids, minlength=3).float() / 4000
    expected = logits[0].softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_repetition_penalty_matches_reference_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[1, 1, 0, 0]], dtype=torch.int32)
    p = SamplingParams.from_pb([params(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)], torch.device("cpu"))
    out = apply_penalties(logits, p, counts, torch.tensor([4]))
    expected = torch.tensor([[2.0 / 2 - 0.5 * 1 / 4 - 0.25, -1.0 * 2 - 0.5 * 1 / 4 - 0.25, 0.5, 3.0]])
    assert torch.allclose(out, expected)


def test_green_list_is_a_gamma_share_keyed_by_the_previous_token():
    green = green_list(torch.arange(64), 4096, 0.25)
    assert torch.equal(green, green_list(torch.arange(64), 4096, 0.25))
    assert abs(green.float().mean().item() - 0.25) < 0.01
    assert len({tuple(row.nonzero().squeeze(-1).tolist()) for row in green}) == 64, "each previous token, its own list"
    assert torch.equal(green_list(torch.tensor([3, 3]), 4096, 0.25)[0], green[3]), "independent of the batch"


def test_watermark_adds_delta_to_green_tokens_before_the_penalties():
    vocab, prev = 64, torch.tensor([7, 7])
    p = SamplingParams.from_pb([params(watermark=True), params()], torch.device("cpu"))
    marked = apply_watermark(torch.zeros(2, vocab), p, prev, Watermark(gamma=0.25, delta=3.0))
    green = green_list(prev[:1], vocab, 0.25)[0]
    assert torch.equal(marked[0], 3.0 * green.float()) and torch.equal(marked[1], torch.zeros(vocab))
    # spec 5.9 order: watermark, then repetition penalty: a seen green token scores (1 + delta) / penalty
    p = SamplingParams.from_pb([params(watermark=True, repetition_penalty=2.0)], torch.device("cpu"))
    seen = int(green.nonzero()[0])
    counts = torch.zeros(1, vocab, dtype=torch.int32)
    counts[0, seen] = 1
    wm = Watermark(gamma=0.25, delta=3.0)
    _, _, logprobs = choose(torch.ones(1, vocab), p, torch.zeros(1, dtype=torch.int64), counts, torch.tensor([4]),
                            prev_ids=prev[:1], watermark=wm)
    expected = 1.0 + 3.0 * green.float()
    expected[seen] = (1.0 + 3.0) / 2.0
    assert torch.allclose(logprobs[0], expected.log_softmax(-1))


def test_watermark_strength_comes_from_the_launcher_env(monkeypatch):
    monkeypatch.setenv("WATERMARK_GAMMA", "0.3")
    monkeypatch.setenv("WATERMARK_DELTA", "4.5")
    assert Watermark.from_env() == Watermark(gamma=0.3, delta=4.5)
    monkeypatch.delenv("WATERMARK_GAMMA")
    monkeypatch.delenv("WATERMARK_DELTA")
    assert Watermark.from_env() == Watermark(gamma=0.5, delta=2.0)


def test_kv_blocks_are_all_or_nothing_and_returned():
    cache = KVCache(1, 4, 1, 2, torch.float32, torch.device("cpu"))
    blocks = cache.allocate([16, 17])
    assert [len(b) for b in blocks] == [1, 2] and cache.free_blocks == 1
    with pytest.raises(OutOfBlocks):
        cache.allocate([1, 1])
    assert cache.free_blocks == 1
    for b in blocks:
        cache.free(b)
    assert cache.free_blocks == 4


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    folder, _ = tiny_model_dir
    gen = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    gen.allocate_cache(1024)
    return gen


def finish(generator, request: pb.Request):
    gens, batch = generator.prefill(generator.new_batch(pb.Batch(id=7, requests=[request])))
    steps = [gens[0]]
    while batch is not None:
        gens, batch = generator.decode([batch])
        steps.append(gens[0])
    return steps


def test_same_seed_same_text_and_seed_reported(generator):
    req = make_request(generator.tokenizer, 1, "Hello world", 12, do_sample=True, seed=1234, temperature=1.5)
    a, b = finish(generator, req), finish(generator, req)
    assert [s.next_tokens.ids[0] for s in a] == [s.next_tokens.ids[0] for s in b]
    assert a[-1].generated_text.seed == 1234
    other = finish(generator, make_request(generator.tokenizer, 1, "Hello world", 12, do_sample=True, seed=99, temperature=1.5))
    assert [s.next_tokens.ids[0] for s in a] != [s.next_tokens.ids[0] for s in other]
    greedy = finish(generator, make_request(generator.tokenizer, 1, "Hello world", 3))
    assert not greedy[-1].generated_text.HasField("seed")


def test_length_stop_and_generated_text(generator):
    steps = finish(generator, make_request(generator.tokenizer, 1, "Hello world", 5))
    assert len(steps) == 5
    final = steps[-1].generated_text
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.generated_tokens == 5
    ids = [s.next_tokens.ids[0] for s in steps]
    assert final.text == generator.tokenizer.decode(ids, skip_special_tokens=True)
    # streamed pieces add up to the text, except trailing bytes that never complete a UTF-8 character
    assert "".join(s.next_tokens.texts[0] for s in steps) == generator.tokenizer.decode(ids).rstrip("\ufffd")


def byte_level_tokens(tok) -> dict[int, int]:
    """Token id of each single byte in a byte-level BPE vocabulary (GPT-2's byte -> character table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {b: tok.convert_tokens_to_ids(c) for b, c in chars.items()}


def test_streamed_text_keeps_characters_split_across_tokens(generator):
    """Bytes of one character arrive as separate tokens: held back until complete, then emitted, never lost."""
    from types import SimpleNamespace

    tok = generator.tokenizer
    byte_token = byte_level_tokens(tok)
    # a 2-byte and a 4-byte character, then a lone continuation byte that never completes one
    new_ids = [byte_token[b] for b in "é😀a".encode() + b"\x80" + b"b"]
    prompt = tok("Hello")["input_ids"]
    request = SimpleNamespace(ids=list(prompt), prefix_offset=max(len(prompt) - 5, 0), read_offset=len(prompt))
    pieces = []
    for token in new_ids:
        pieces.append(generator._incremental_texts([request], [token])[0])
        request.ids.append(token)
    assert pieces == ["", "é", "", "", "", "😀", "a", "", "\ufffdb"]
    assert "".join(pieces) == tok.decode(new_ids)


def test_stop_sequence_ends_generation(generator):
    steps = finish(generator, make_request(generator.tokenizer, 1, "Hello world", 12))
    texts = [s.next_tokens.texts[0] for s in steps]
    stop = next(t for t in texts[2:] if t.strip())
    req = make_request(generator.tokenizer, 1, "Hello world", 12)
    req.stopping_parameters.stop_sequences.append(stop)
    cut = finish(generator, req)
    assert cut[-1].generated_text.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert cut[-1].generated_text.text.endswith(stop)
    assert len(cut) <= texts.index(stop) + 1


def test_eos_stops_unless_ignored(generator):
    steps = finish(generator, make_request(generator.tokenizer, 1, "Hello world", 6))
    first = steps[0].next_tokens.ids[0]
    generator.eos_ids = torch.tensor([first])
    try:
        req = make_request(generator.tokenizer, 1, "Hello world", 6)
        req.stopping_parameters.ignore_eos_token = False
        stopped = finish(generator, req)
        assert len(stopped) == 1 and stopped[0].generated_text.finish_reason == pb.FINISH_REASON_EOS_TOKEN
        assert len(finish(generator, make_request(generator.tokenizer, 1, "Hello world", 6))) == 6
    finally:
        generator.eos_ids = torch.tensor([generator.tokenizer.eos_token_id])


def test_prompt_logprobs_equal_log_softmax_of_transformers(generator, tiny_model_dir):
    _, model = tiny_model_dir
    req = make_request(generator.tokenizer, 1, "What is the capital of France?", 2)
    req.prefill_logprobs = True
    steps = finish(generator, req)
    prefill = steps[0].prefill_tokens
    ids = torch.tensor([list(prefill.ids)])
    with torch.no_grad():
        ref = model(ids).logits[0].log_softmax(-1)
    assert math.isnan(prefill.logprobs[0])
    expected = ref[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(list(prefill.logprobs[1:])), expected, atol=1e-4)
    assert abs(steps[0].next_tokens.logprobs[0] - ref[-1].max().item()) < 1e-4


def watermark_z(sequences: list[list[int]], vocab: int, gamma: float) -> float:
    """Kirchenbauer et al.'s detector: how many standard deviations the count of green tokens (each scored against
    the green list of the token before it) lies above what text without a watermark would give."""
    prev = torch.tensor([t for seq in sequences for t in seq[:-1]])
    tokens = torch.tensor([t for seq in sequences for t in seq[1:]])
    green = green_list(prev, vocab, gamma)[torch.arange(len(tokens)), tokens].sum().item()
    return (green - gamma * len(tokens)) / math.sqrt(len(tokens) * gamma * (1 - gamma))


def test_watermarked_text_is_detectable_and_plain_text_is_not(generator):
    prompts = ["Hello world", "The quick brown fox", "What is the capital", "LoRA adapters change"]

    def texts(watermark: bool) -> list[list[int]]:
        requests = [make_request(generator.tokenizer, i, p, 40, do_sample=True, seed=100 + i, watermark=watermark)
                    for i, p in enumerate(prompts)]
        out = {r.id: [r.tokenized_inputs.ids[-1]] for r in requests}  # the first token is keyed on the prompt's last
        gens, batch = generator.prefill(generator.new_batch(pb.Batch(id=9, requests=requests)))
        while True:
            for g in gens:
                out[g.request_id].extend(g.next_tokens.ids)
            if batch is None:
                return list(out.values())
            gens, batch = generator.decode([batch])

    gamma = generator.watermark.gamma
    assert watermark_z(texts(True), generator.vocab, gamma) > 4.0
    assert abs(watermark_z(texts(False), generator.vocab, gamma)) < 2.0


@pytest.mark.parametrize("vocab", [1000, 2048, 49152, 50257])
def test_argmax_rows_is_argmax_with_first_index_on_ties(vocab: int) -> None:
    torch.manual_seed(vocab)
    logits = torch.randint(0, 6, (9, vocab)).float()  # many exact ties
    logits[1, -2:] = 7.0  # the maximum in the partial last chunk
    logits[2, :] = float("-inf")
    logits[2, 5] = 0.0
    logits[3, 1500 % vocab] = 1e9
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
