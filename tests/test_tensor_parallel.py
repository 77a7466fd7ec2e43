"""Tensor-parallel split arithmetic: uneven intermediate parts, a padded vocabulary, heads that must divide; and the
per-rank slices of a model whose sizes do not divide, recombined by hand, equal the one-shard model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorax_server.dist import Parallel
from lorax_server.models import load_model
from tests.tiny_models import make_model


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
