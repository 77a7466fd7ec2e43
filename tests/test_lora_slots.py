"""The device tier's slot pools and the multi-LoRA op: each token gets exactly its own adapter's delta, read from
wherever that adapter's rows landed, after loads, offloads, reloads and pool growth."""
from __future__ import annotations

import pytest
import torch

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.slots import SlotPools
from lorax_server.adapters.weights import LoraWeights
from lorax_server.layers import lora_kernel
from lorax_server.layers.lora import GROUPS, LoraBatch

LAYERS = 3
OUTS = {"q_proj": 12, "k_proj": 4, "v_proj": 4, "o_proj": 12, "gate_proj": 20, "up_proj": 20, "down_proj": 12}
INS = {"q_proj": 12, "k_proj": 12, "v_proj": 12, "o_proj": 12, "gate_proj": 12, "up_proj": 12, "down_proj": 20}
SPECS = [(4, ["q_proj", "v_proj"]), (8, list(OUTS)), (2, ["down_proj"]), (16, ["q_proj", "k_proj", "o_proj"]),
         (64, ["gate_proj", "up_proj"])]


def random_adapter(rank: int, targets: list[str]) -> LoraWeights:
    return LoraWeights(rank, {m: (torch.randn(LAYERS, INS[m], rank), torch.randn(LAYERS, rank, OUTS[m])) for m in targets})


def pools(dtype=torch.float32, budget=1 << 30) -> SlotPools:
    return SlotPools({m: (INS[m], OUTS[m]) for m in OUTS}, LAYERS, dtype, torch.device("cpu"), budget)


def expected_delta(adapter: LoraWeights | None, modules: tuple[str, ...], x: torch.Tensor, layer: int) -> torch.Tensor:
    parts = []
    for m in modules:
        if adapter is None or m not in adapter.modules:
            parts.append(torch.zeros(OUTS[m]))
        else:
            a, b = adapter.modules[m]
            parts.append(x @ a[layer] @ b[layer])
    return torch.cat(parts)


def scrambled_pools(dtype=torch.float32) -> tuple[SlotPools, dict[int, LoraWeights]]:
    """Adapters loaded, some offloaded and others loaded into the freed rows and slots, one reloaded: rows are
    no longer in load order and slots no longer follow router indices."""
    torch.manual_seed(0)
    p = pools(dtype)
    loaded = {}
    for index, (rank, targets) in enumerate(SPECS * 2, start=1):
        loaded[index] = random_adapter(rank, targets)
        p.add(index, loaded[index])
    for index in (2, 5, 7):
        p.remove(index)
        del loaded[index]
    loaded[20] = random_adapter(32, list(OUTS))
    p.add(20, loaded[20])
    loaded[3] = random_adapter(8, ["v_proj", "down_proj"])
    p.add(3, loaded[3])  # reload under the same index: its old rows go back, new ones are written
    return p, loaded


def slots_and_batch(p: SlotPools, indices: list[int]) -> tuple[torch.Tensor, LoraBatch]:
    """Each token's slot, and the LoRA batch of a forward pass whose tokens use `indices`."""
    slots = p.token_slots(torch.tensor(indices), frozenset(indices))
    return slots, LoraBatch(p, slots, OUTS, {p.slot_of[i] for i in set(indices) - {0}})


@pytest.mark.parametrize("op", ["cpu_kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_token_gets_its_own_adapter(op, dtype, monkeypatch):
    if op == "reference":
        monkeypatch.setattr(lora_kernel, "cpu_op", lambda: lora_kernel.lora_apply_reference)
    p, loaded = scrambled_pools(dtype)
    indices = [0, 20, 1, 1, 3, 0, 10, 4, 9, 8, 20, 6, 1]  # 0 = base; uneven counts, out of order
    slots, batch = slots_and_batch(p, indices)
    assert [int(s) for s in slots][:2] == [-1, p.slot_of[20]]
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    for group, modules in GROUPS.items():
        for layer in range(LAYERS):
            x = torch.randn(len(indices), INS[modules[0]]).to(dtype)
            y = torch.randn(len(indices), sum(OUTS[m] for m in modules)).to(dtype)
            expected = y.float().clone()
            for t, index in enumerate(indices):
                adapter = loaded.get(index)
                if adapter is not None:
                    adapter = LoraWeights(adapter.rank, {m: (a.to(dtype).float(), b.to(dtype).float())
                                                         for m, (a, b) in adapter.modules.items()})
                expected[t] += expected_delta(adapter, modules, x[t].float(), layer)
            got = batch.apply(group, layer, x, y).float()
            assert torch.allclose(got, expected, atol=tolerance, rtol=0.02), (group, layer)
            base_rows = [t for t, i in enumerate(indices) if i == 0]
            assert torch.equal(got[base_rows], y[base_rows].float()), "base tokens get an exact zero delta"


def test_kernel_equals_reference_on_a_prefill_sized_batch():
    p, loaded = scrambled_pools()
    indices = [20] * 300 + [0] * 5 + [4] * 200 + [1] * 100
    batch_slots, batch = slots_and_batch(p, indices)
    for group, modules in GROUPS.items():
        x = torch.randn(len(indices), INS[modules[0]])
        y = torch.randn(len(indices), sum(OUTS[m] for m in modules))
        y_ref = y.clone()
        pools_args = batch._groups[group]
        lora_kernel.cpu_op()(y, x, batch_slots, *pools_args, 2)
        lora_kernel.lora_apply_reference(y_ref, x, batch_slots, *pools_args, 2)
        assert torch.allclose(y, y_ref, atol=1e-4), group


def test_rows_and_slots_are_reused_and_bytes_reported():
    p = pools()
    first = p.add(1, random_adapter(8, ["q_proj"]))
    held = p.bytes_held
    row_bytes = LAYERS * (INS["q_proj"] + OUTS["q_proj"]) * 4
    assert p.bytes_used == 8 * row_bytes and held >= p.bytes_used
    p.remove(1)
    assert p.bytes_used == 0 and p.bytes_held == held, "offloading keeps the pools, frees the rows"
    second = p.add(2, random_adapter(8, ["q_proj"]))
    assert second != first, "a freed slot is reused last"
    assert p.bytes_held == held, "freed rows are reused without growing the pools"
    with pytest.raises(ValueError, match="index 1 is not loaded"):
        p.token_slots(torch.tensor([2, 1]), frozenset({2, 1}))


def test_a_rank_beyond_the_budget_is_refused_and_nothing_changes():
    row_bytes = LAYERS * (INS["q_proj"] + OUTS["q_proj"]) * 4
    p = pools(budget=100 * row_bytes)
    p.add(1, random_adapter(64, ["q_proj"]))
    with pytest.raises(AdapterError, match="does not fit the adapter pools"):
        p.add(2, random_adapter(64, ["q_proj"]))
    assert list(p.slot_of) == [1] and p.bytes_held <= 100 * row_bytes
    p.add(3, random_adapter(32, ["q_proj"]))  # what fits still loads, growing to exactly what is needed
    assert set(p.slot_of) == {1, 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference_at_model_widths(dtype):
    """Widths of 16 and more take the kernel's vector loops (four rank rows at a time, then the leftover rows and
    columns): ranks 3, 4, 9 and 64 and widths 37, 64 and 100 cover every remainder."""
    torch.manual_seed(1)
    ins, outs, layers = {"q_proj": 64, "v_proj": 37}, {"q_proj": 100, "v_proj": 37}, 2
    p = SlotPools({m: (ins[m], outs[m]) for m in outs}, layers, dtype, torch.device("cpu"), 1 << 30)
    for index, rank in enumerate((3, 4, 9, 64), start=1):
        p.add(index, LoraWeights(rank, {m: (torch.randn(layers, ins[m], rank), torch.randn(layers, rank, outs[m]))
                                        for m in outs}))
    indices = [1, 2, 0, 3, 4, 4, 1]
    slots = p.token_slots(torch.tensor(indices), frozenset(indices))
    for module in outs:
        pool = p.pools[module]
        x = torch.randn(len(indices), ins[module])
        y = torch.randn(len(indices), outs[module])
        y_ref, y_before = y.clone(), y.clone()
        lora_kernel.cpu_op()(y, x, slots, [pool.a], [pool.b], [pool.rows], [0], 1)
        lora_kernel.lora_apply_reference(y_ref, x, slots, [pool.a], [pool.b], [pool.rows], [0], 1)
        assert torch.allclose(y, y_ref, atol=1e-3, rtol=1e-4), module
        changed = (y != y_before).any(dim=1).tolist()
        assert changed == [i != 0 for i in indices], "adapter tokens change, base tokens do not"
