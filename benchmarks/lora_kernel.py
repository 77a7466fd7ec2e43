"""What one token's adapter costs in the multi-LoRA kernel, and whether it pays for its neighbours.

On SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536, 3 KV heads of 64), with adapters loaded into the
shard's slot pools, times one decode step's LoRA work (`lora_apply` for every projection group and layer):
(1) 32 tokens, each on its own r=8 q,v adapter; (2) the same 32 tokens plus one token on an r=64 adapter on all
seven projections; (3) that r=64 token alone. If each token pays only for its own rank and targets,
(2) - (3) equals (1). Also prints the bytes of LoRA weights one step reads and the bandwidth that implies: a
decode step reads every adapter in the batch once, so on a CPU it is bound by memory bandwidth.

Usage: python benchmarks/lora_kernel.py [--repeats 20] [--pool-dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorax_server.adapters.slots import SlotPools  # noqa: E402
from lorax_server.adapters.weights import LoraWeights  # noqa: E402
from lorax_server.layers.lora import GROUPS, LoraBatch  # noqa: E402

LAYERS, HIDDEN, INTER, KV = 30, 576, 1536, 192
SIZES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
         "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
GROUP_IN = {"qkv": HIDDEN, "o": HIDDEN, "gate_up": HIDDEN, "down": INTER}
_FLUSH = torch.zeros(128 << 20)  # 512 MiB, about SmolLM2's float32 weights


def adapter(rank: int, targets: list[str]) -> LoraWeights:
    return LoraWeights(rank, {m: (torch.randn(LAYERS, SIZES[m][0], rank) * 0.01, torch.randn(LAYERS, rank, SIZES[m][1]) * 0.01)
                              for m in targets})


def step_seconds(pools: SlotPools, indices: list[int], repeats: int) -> float:
    """Best-of-`repeats` time of one decode step's LoRA work for tokens on the given router indices."""
    used = frozenset(indices)
    slots = pools.token_slots(torch.tensor(indices), used)
    outs = {m: out for m, (_, out) in SIZES.items()}
    batch = LoraBatch(pools, slots, outs, {pools.slot_of[i] for i in used - {0}})
    xs = {g: torch.randn(len(indices), GROUP_IN[g]) for g in GROUPS}
    ys = {g: torch.zeros(len(indices), sum(SIZES[m][1] for m in GROUPS[g])) for g in GROUPS}
    best = float("inf")
    for _ in range(repeats):
        _FLUSH.add_(1.0)  # as a real step does, stream the base weights through the caches between LoRA calls
        start = time.perf_counter()
        for layer in range(LAYERS):
            for group in GROUPS:
                batch.apply(group, layer, xs[group], ys[group])
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pool-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    pools = SlotPools(SIZES, LAYERS, getattr(torch, args.pool_dtype), torch.device("cpu"), 8 << 30)
    small = [adapter(8, ["q_proj", "v_proj"]) for _ in range(32)]
    big = adapter(64, list(SIZES))
    for i, weights in enumerate(small, start=1):
        pools.add(i, weights)
    pools.add(100, big)
    step_seconds(pools, list(range(1, 33)), 3)  # build the kernel, warm the caches
    alone_small = step_seconds(pools, list(range(1, 33)), args.repeats)
    mixed = step_seconds(pools, list(range(1, 33)) + [100], args.repeats)
    alone_big = step_seconds(pools, [100], args.repeats)
    size = torch.empty((), dtype=pools.dtype).element_size() / 4  # LoraWeights are float32 on the host
    small_bytes, big_bytes = sum(w.nbytes for w in small) * size, big.nbytes * size
    print(f"(1) 32 tokens on 32 r=8 q,v adapters      {alone_small * 1e3:7.2f} ms   ({small_bytes / 2**20:.0f} MiB read, "
          f"{small_bytes / alone_small / 1e9:.1f} GB/s)")
    print(f"(2) the same plus 1 token on r=64 all-7   {mixed * 1e3:7.2f} ms")
    print(f"(3) the r=64 all-7 token alone             {alone_big * 1e3:7.2f} ms   ({big_bytes / 2**20:.0f} MiB read, "
          f"{big_bytes / alone_big / 1e9:.1f} GB/s)")
    print(f"(2) - (3) = {(mixed - alone_big) * 1e3:.2f} ms against (1) = {alone_small * 1e3:.2f} ms: the 32 r=8 tokens "
          f"pay {(mixed - alone_big) / alone_small:.2f}x their own cost beside the r=64 one")


if __name__ == "__main__":
    main()
