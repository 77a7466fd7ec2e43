"""Tensor-parallel split arithmetic: uneven intermediate parts, a padded vocabulary, heads that must divide; the
per-rank slices of a model whose sizes do not divide, recombined by hand, equal the one-shard model; two ranks run as
threads equal transformers+peft; vocabulary ids past the tokenizer generate without errors."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lorax_server.dist import Parallel
from lorax_server.models import load_model
from tests.test_model_families import UNSET
from tests.tiny_models import make_adapter, make_model


@pytest.mark.parametrize("size,world", [(129, 2), (128, 2), (10, 3), (11, 4), (3, 4)])
def test_uneven_parts_cover_every_item_once_and_differ_by_at_most_one(size, world):
    parts = [Parallel(rank, world).split_uneven(size) for rank in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(stop == start for (_, stop), (start, _) in zip(parts, parts[1:]))
    lengths = [stop - start for start, stop in parts]
    assert max(lengths) - min(lengths) <= 1 and sorted(lengths, reverse=True) == lengths


@pytest.mark.parametrize("size,world,part", [(321, 2, 161), (320, 2, 160), (50257, 4, 12565), (7, 3, 3)])
def test_padded_parts_are_equal_and_cover_the_vocabulary(size, world, part):
    parts = [Parallel(rank, world).split_padded(size) for rank in range(world)]
    assert parts == [(rank * part, (rank + 1) * part) for rank in range(world)]
    assert parts[-1][1] >= size > parts[-1][0]


def test_heads_must_divide_with_the_reason():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by the number of shards \(3\)"):
        Parallel(1, 3).split(4, "num_attention_heads")


def test_rank_slices_of_an_odd_vocab_and_intermediate_recombine_to_the_whole_model(tmp_path):
    make_model("llama", tmp_path, vocab_size=321, intermediate_size=129)
    cpu = torch.device("cpu")
    whole = load_model(tmp_path, None, cpu, Parallel())
    ranks = [load_model(tmp_path, None, cpu, Parallel(rank, 2)) for rank in range(2)]
    assert [m.embed.shape[0] for m in ranks] == [161, 161]
    assert torch.equal(ranks[1].embed[-1], torch.zeros(64)), "the padding row"
    torch.testing.assert_close(torch.cat([m.embed for m in ranks])[:321], whole.embed, rtol=0, atol=0)

    x = torch.randn(5, 64)
    gathered = torch.cat([m.lm_head(x) for m in ranks], dim=-1)
    assert gathered.shape[-1] == 322
    torch.testing.assert_close(gathered[:, :321], whole.lm_head(x))

    assert [m.layers[0].inter_range for m in ranks] == [(0, 65), (65, 129)]
    shapes = [m.lora_shapes() for m in ranks]
    assert [(s["gate_proj"].start, s["down_proj"].stop) for s in shapes] == [(0, 65), (65, 129)]

    def mlp(layer, x):
        gate, up = layer.gate_up(x).split([layer.inter, layer.inter], dim=-1)
        return layer.down(F.silu(gate) * up)

    torch.testing.assert_close(sum(mlp(m.layers[0], x) for m in ranks), mlp(whole.layers[0], x))


class ThreadGroup:
    """A process group stand-in for ranks that are threads of this process: each collective meets at a barrier."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size)
        self.parts: list[torch.Tensor | None] = [None] * world_size

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.parts[rank] = tensor.clone()
        self.barrier.wait()
        parts = list(self.parts)
        self.barrier.wait()  # nobody overwrites a part before every rank has read them all
        return parts


@dataclass(frozen=True)
class ThreadParallel(Parallel):
    group: ThreadGroup | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self.group.exchange(self.rank, tensor)
        return tensor.copy_(sum(parts[1:], parts[0]))

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.rank, tensor), dim=-1)


@pytest.mark.parametrize("family,targets,sizes", [
    ("qwen3", (["q_proj", "k_proj", "v_proj"], ["o_proj", "gate_proj", "down_proj"]), {}),
    ("gemma2", (["q_proj", "o_proj"], ["up_proj", "down_proj"]), {}),
    ("phi3", (["qkv_proj"], ["gate_up_proj", "o_proj", "down_proj"]), {}),
    ("mixtral", (["q_proj", "k_proj", "v_proj"], ["o_proj"]), {}),
    ("qwen2-moe", (["q_proj", "k_proj", "v_proj"], ["o_proj"]),
     dict(moe_intermediate_size=49, shared_expert_intermediate_size=81)),
    ("stablelm", (["q_proj", "k_proj", "v_proj"], ["o_proj", "gate_proj", "down_proj"]), {}),
    ("falcon", (["query_key_value"], ["dense", "dense_h_to_4h", "dense_4h_to_h"]), dict(ffn_hidden_size=129)),
    ("falcon-7b", (["query_key_value", "dense_4h_to_h"], ["dense", "dense_h_to_4h"]), dict(ffn_hidden_size=129)),
    ("bloom", (["query_key_value"], ["dense", "dense_h_to_4h", "dense_4h_to_h"]), {}),
    ("mpt", (["Wqkv"], ["out_proj", "up_proj", "down_proj"]), dict(intermediate_size=UNSET)),  # expansion_ratio's
    ("gpt-neo", (["q_proj", "v_proj", "out_proj"], ["k_proj", "c_fc", "c_proj"]), {}),
])
def test_two_ranks_with_adapters_equal_peft(family, targets, sizes, tmp_path, monkeypatch):
    """Two ranks on an odd vocabulary and intermediate size, two adapters and the base model in one batch (Qwen3: its
    per-head q/k norms over the one KV head each rank keeps; Gemma 2: soft-capping, alternating windows). Phi-3:
    fused qkv_proj / gate_up_proj sliced part by part, adapters on them too; MoE: each expert (and Qwen2-MoE's shared
    one) split unevenly. StableLM: per-head q/k LayerNorms of each rank's heads, one all-reduce for its parallel
    residual. Falcon: query_key_value's KV-head blocks (base, bias and adapter B) split by heads; multi-query: the
    one KV head on both ranks. Bloom: per-head [q, k, v] rows, each rank with its heads' ALiBi slopes. MPT: Wqkv's
    q, k and v parts (base and adapter B) split by heads, clamped, each rank with its heads' slopes. GPT-Neo: the
    position embeddings whole on each rank, out_proj's and c_proj's biases added once after the all-reduce."""
    from peft import PeftModel

    from lorax_server.adapters.registry import AdapterKey, AdapterRegistry
    from lorax_server.kv_cache import BLOCK_SIZE
    from lorax_server.layers.attention import build_metadata
    from tests.test_model_families import make_family_model

    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    sizes = {"vocab_size": 321, "intermediate_size": 129, **sizes}
    reference, tok = make_family_model(family, tmp_path / "base", **sizes)
    if family in ("mixtral", "qwen2-moe"):  # transformers' default grouped matmul refuses experts of odd feature counts
        reference.set_experts_implementation("eager")
    adapters = [make_adapter(reference, tmp_path / "a1", 1, 8, 16, targets[0]),
                make_adapter(reference, tmp_path / "a2", 2, 4, 8, targets[1])]
    prompts = [tok(p)["input_ids"] for p in ("The quick brown fox", "The quick brown fox", "The quick brown fox")]
    lens = torch.tensor([len(p) for p in prompts])
    group = ThreadGroup(2)

    def rank_logits(rank: int) -> torch.Tensor:
        model = load_model(tmp_path / "base", None, torch.device("cpu"), ThreadParallel(rank, 2, group))
        registry = AdapterRegistry(model, torch.device("cpu"))
        for index, folder in enumerate(adapters, start=1):
            registry.load(AdapterKey((str(folder),), "local"), index)
        lora = registry.lora_batch(torch.tensor([0, 1, 2]), frozenset({0, 1, 2}), (lens, int(lens.sum())))
        cache = torch.zeros(model.cfg.num_layers, 2, model.num_kv_heads, 3 * BLOCK_SIZE, model.cfg.head_dim)
        meta = build_metadata(lens, lens, torch.tensor([[0], [1], [2]]), BLOCK_SIZE, model.cfg.sliding_window,
                              int(lens.max()), int(lens.max()))
        flat = torch.tensor([t for p in prompts for t in p])
        return model.forward(flat, meta, cache, torch.arange(len(flat)), lora)

    with ThreadPoolExecutor(2) as pool:
        ranks = list(pool.map(rank_logits, range(2)))
    assert torch.equal(ranks[0], ranks[1]) and ranks[0].shape == (int(lens.sum()), 321)

    peft = PeftModel.from_pretrained(reference, adapters[0], adapter_name="a1")
    peft.load_adapter(adapters[1], adapter_name="a2")
    expected = []
    with torch.no_grad(), peft.disable_adapter():
        expected.append(peft(torch.tensor([prompts[0]])).logits[0])
    for i in (1, 2):
        peft.set_adapter(f"a{i}")
        with torch.no_grad():
            expected.append(peft(torch.tensor([prompts[i]])).logits[0])
    for got, want in zip(ranks[0].split(lens.tolist()), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected[1], expected[2]), "the adapters must change the logits"


def test_ids_past_the_tokenizer_are_generated_with_empty_text(tmp_path):
    """Vocab 321 over a 320-token tokenizer (the kind of vocabulary padding shards face): id 320, given a strong head
    row, is chosen greedily, streamed with empty text and left out of the generated text, without an error."""
    import lorax_server.pb.generate_pb2 as pb
    from lorax_server.shard import build_service
    from tests.test_shard_exactness import PROMPTS, make_request

    model = make_model("llama", tmp_path, vocab_size=321)
    with torch.no_grad():
        model.lm_head.weight[320] = model.lm_head.weight[5] * 3
    model.save_pretrained(tmp_path)
    generator = build_service(str(tmp_path), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    generator.allocate_cache(1024)
    request = make_request(generator.tokenizer, 0, PROMPTS[0], 6)
    gens, batch = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=[request])))
    tokens = []
    while True:
        tokens += zip(gens[0].next_tokens.ids, gens[0].next_tokens.texts)
        if gens[0].HasField("generated_text"):
            break
        gens, batch = generator.decode([batch])
    assert (320, "") in tokens and len(tokens) == 6
    assert gens[0].generated_text.text == generator.tokenizer.decode([t for t, _ in tokens if t != 320])
