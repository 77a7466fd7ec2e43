"""The shard's adapters across three tiers: disk (the weights cache), host memory (a bounded LRU of recently
used adapters, so re-activating one does not re-read disk) and the device (what the router activated: slots in
the preallocated pools of `slots.py`). Per batch it only maps requests to slots.

Every adapter RPC passes the access ledger (`access.py`) before any tier answers: an adapter fetched with a
credential is served to another credential only once its source accepts that one too."""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from lorax_server.adapters.access import AccessLedger
from lorax_server.adapters.config import AdapterError, read_config
from lorax_server.adapters.deadline import within_deadline
from lorax_server.adapters.merge import merge
from lorax_server.adapters.sources import CREDENTIAL_SOURCES, fetch_adapter, prove_access
from lorax_server.adapters.weights import LoraWeights, load_lora, shard_lora
from lorax_server.adapters.slots import SlotPools
from lorax_server.layers.lora import LoraBatch
from lorax_server.pb import generate_pb2
from lorax_server.sources import cache_dir

logger = logging.getLogger(__name__)

BASE_MODEL_ID = "__base_model__"
SOURCE_NAMES = {v: k.lower() for k, v in generate_pb2.AdapterSource.items()}
STRATEGY_NAMES = {v: k.lower() for k, v in generate_pb2.MergeStrategy.items()}
SIGN_NAMES = {v: k.lower() for k, v in generate_pb2.MajoritySignMethod.items()}


@dataclass(frozen=True)
class AdapterKey:
    """What identifies an adapter's weights: ids, source, and the merge parameters when several."""

    ids: tuple[str, ...]
    source: str
    weights: tuple[float, ...] = ()
    strategy: str = "linear"
    density: float = 1.0
    sign_method: str = "total"

    @classmethod
    def from_pb(cls, params: generate_pb2.AdapterParameters, source: int) -> "AdapterKey":
        ids = tuple(params.adapter_ids)
        if len(ids) <= 1:
            return cls(ids, SOURCE_NAMES.get(source, "hub"))
        return cls(
            ids, SOURCE_NAMES.get(source, "hub"), tuple(params.weights), STRATEGY_NAMES[params.merge_strategy],
            params.density, SIGN_NAMES[params.majority_sign_method],
        )

    @property
    def is_base(self) -> bool:
        return not self.ids or self.ids == (BASE_MODEL_ID,) or self.ids == ("",)

    def __str__(self) -> str:
        return "+".join(self.ids)


def _base_config(base: str | None) -> Path | None:
    """config.json of an adapter's base model if it is a local folder or in the hub cache, else None."""
    if not base:
        return None
    if os.path.isdir(base):
        path = Path(base) / "config.json"
        return path if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(base, "config.json", cache_dir=cache_dir())
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _describe(config: dict) -> str:
    return f"{(config.get('architectures') or ['?'])[0]}, hidden size {config.get('hidden_size', '?')}"


POOL_DTYPE_ENV = "LORAX_ADAPTER_DTYPE"


def pool_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype adapter weights are held in on the device tier: the model's, or with LORAX_ADAPTER_DTYPE=bfloat16 on
    CPU, bfloat16. LoRA on CPU reads every adapter of a batch from memory each step, so halving its bytes speeds up
    batches of large adapters and doubles how many fit; outputs then differ from float32 peft by the rounding of the
    adapter weights (float32 math stays). CUDA keeps the model's dtype (already half precision there)."""
    value = os.environ.get(POOL_DTYPE_ENV, "").strip().lower()
    if not value or value == str(model_dtype).removeprefix("torch."):
        return model_dtype
    if value != "bfloat16":
        raise ValueError(f"{POOL_DTYPE_ENV} must be bfloat16 (or the model's dtype), not {value!r}")
    if device.type != "cpu":
        raise ValueError(f"{POOL_DTYPE_ENV}=bfloat16 applies on CPU; on CUDA adapters keep the model's dtype")
    return torch.bfloat16


class AdapterRegistry:
    def __init__(self, model, device: torch.device, host_capacity: int = 64, model_id: str = "the base model"):
        self.model, self.device, self.dtype, self.model_id = model, device, model.dtype, model_id
        self.shapes = model.lora_shapes()
        self.host_capacity = host_capacity
        self.host: OrderedDict[AdapterKey, LoraWeights] = OrderedDict()  # CPU tier, LRU
        self._host_lock = threading.Lock()  # the reader and model threads share the LRU
        self.disk: dict[Path, int] = {}  # weight bytes of every adapter folder this shard has read
        self.access = AccessLedger(lambda *args: within_deadline(f"adapter '{args[1]}'", prove_access, *args))
        local = {
            m: (s.local_features if s.split == "in" else s.in_features, s.local_features if s.split == "out" else s.out_features)
            for m, s in self.shapes.items()
        }
        self._out_sizes = {m: out for m, (_, out) in local.items()}
        self.pools = SlotPools(local, len(model.layers), pool_dtype(model.dtype, device), device, int(self._reservation()))

    # ---- tiers ------------------------------------------------------------------------------------
    def download(self, key: AdapterKey, api_token: str | None = None, trusted: bool = False) -> list[Path] | None:
        """The local folder of every id of the adapter (network and disk only, no tensor work: safe on any
        thread); None when the host tier already holds it. Each source call is bounded (deadline.py)."""
        if BASE_MODEL_ID in key.ids:
            raise AdapterError("merged adapters cannot include the base model")
        self._check_access(key, api_token)
        if key in self.host:
            return None
        folders = [
            within_deadline(f"adapter '{i}'", fetch_adapter, i, key.source, api_token, trusted) for i in key.ids
        ]
        for i in key.ids:
            self.access.record(key.source, i, api_token if key.source in CREDENTIAL_SOURCES else None)
        return folders

    def _check_access(self, key: AdapterKey, api_token: str | None) -> None:
        for i in key.ids:
            self.access.check(key.source, i, api_token)

    def _read_one(self, folder: Path, adapter_id: str, scale: float | None = None) -> tuple[LoraWeights, float]:
        config = read_config(folder, adapter_id, tuple(self.shapes))
        self._check_base(config.base_model_name_or_path, adapter_id)
        weights = load_lora(
            folder, adapter_id, config, config.scale if scale is None else scale, self.shapes, len(self.model.layers)
        )
        # only folders that held a usable adapter count in the disk tier
        self.disk[folder] = sum(f.stat().st_size for f in folder.glob("adapter_model*") if f.is_file())
        return weights, config.scale

    def _check_base(self, base: str | None, adapter_id: str) -> None:
        """Refuse an adapter trained on another base model when that base's config.json is at hand (a local folder
        or the hub cache; nothing is downloaded for it): architecture and hidden size must match ours."""
        path = _base_config(base)
        if path is None:
            return
        theirs, ours = json.loads(path.read_text()), self.model.cfg.raw
        if any(theirs.get(k) and ours.get(k) and theirs[k] != ours[k] for k in ("architectures", "hidden_size")):
            raise AdapterError(
                f"adapter '{adapter_id}' was trained for '{base}' ({_describe(theirs)}), but this server runs "
                f"'{self.model_id}' ({_describe(ours)})"
            )

    def fetch(
        self, key: AdapterKey, api_token: str | None = None, trusted: bool = False, folders: list[Path] | None = None
    ) -> LoraWeights:
        """The adapter's CPU weights: from the host LRU, else read (and merge) from `folders` (downloaded here
        when not given). Runs on the reader thread beside the model thread (see server.py), so the LRU is only
        touched under its lock."""
        with self._host_lock:
            cached = self.host.get(key)
            if cached is not None:
                self.host.move_to_end(key)
        if cached is not None:
            self._check_access(key, api_token)
            return cached
        folders = folders or self.download(key, api_token, trusted)
        if len(key.ids) == 1:
            whole, _ = self._read_one(folders[0], key.ids[0])
        else:
            parts = [self._read_one(folder, i, scale=1.0) for folder, i in zip(folders, key.ids)]
            if key.weights and len(key.weights) != len(key.ids):
                raise AdapterError("number of adapter IDs must match number of adapter weights")
            merged = merge([w for w, _ in parts], list(key.weights), key.strategy, key.density, key.sign_method)
            first_scale = parts[0][1]
            whole = LoraWeights(merged.rank, {m: (a, b * first_scale) for m, (a, b) in merged.modules.items()})
        weights = shard_lora(whole, self.shapes)
        with self._host_lock:
            self.host[key] = weights
            while len(self.host) > self.host_capacity:
                self.host.popitem(last=False)
        return weights

    def _reservation(self) -> float:
        """Bytes set aside for device adapters: ADAPTER_MEMORY_FRACTION of the device's (or host's) memory."""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
        else:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return float(os.environ.get("ADAPTER_MEMORY_FRACTION", "0.1")) * total

    def memory_fraction(self, weights: LoraWeights) -> float:
        """Share of the adapter memory reservation one adapter takes (the router's budget unit)."""
        reserved = self._reservation()
        if reserved <= 0:
            raise AdapterError("Memory reserved for adapters is 0 (ADAPTER_MEMORY_FRACTION)")
        fraction = weights.nbytes / reserved
        if fraction > 1:
            raise AdapterError(f"adapter is larger than the adapter memory reservation ({weights.nbytes} bytes)")
        return fraction

    def load(
        self, key: AdapterKey, index: int, api_token: str | None = None, trusted: bool = False,
        folders: list[Path] | None = None,
    ) -> None:
        """Write the adapter into a device slot under the router's index (runs on the model thread)."""
        weights = self.fetch(key, api_token, trusted, folders)
        slot = self.pools.add(index, weights)
        logger.info("adapter %s loaded at index %d into slot %d (rank %d)", key, index, slot, weights.rank)

    def offload(self, index: int) -> bool:
        """Free the adapter's slot and rows (the host copy stays in the LRU)."""
        return self.pools.remove(index)

    def memory(self) -> generate_pb2.AdapterMemory:
        """Adapters and bytes per tier, reported to the router with every adapter RPC (it exports them as metrics).

        Fetches run on worker threads and loads on the model thread, so the tiers are copied (one C-level step under
        the GIL) before they are summed: iterating a dict another thread grows would raise."""
        host, disk = list(self.host.values()), list(self.disk.values())
        return generate_pb2.AdapterMemory(
            device_bytes=self.pools.bytes_used, device_adapters=len(self.pools.slot_of),
            device_pool_bytes=self.pools.bytes_held,
            host_bytes=sum(w.nbytes for w in host), host_adapters=len(host),
            disk_bytes=sum(disk), disk_adapters=len(disk),
        )

    # ---- per batch -------------------------------------------------------------------------------
    def lora_batch(
        self, adapter_indices: torch.Tensor, used: frozenset[int], token_counts: tuple[torch.Tensor, int] | None
    ) -> LoraBatch | None:
        """LoRA inputs for a batch whose requests use `adapter_indices` (one per request; `used` is their set, on the
        host). `token_counts` is (tokens per request, total) in prefill, None in decode (one token each). None when
        the batch runs only the base model. Index 0 is the static adapter when --adapter-id loaded one, else the base."""
        loaded = used & self.pools.slot_of.keys()
        if not loaded:
            return None
        slots = self.pools.token_slots(adapter_indices, used)
        if token_counts is not None:
            counts, total = token_counts
            slots = slots.repeat_interleave(counts, output_size=total)
        return LoraBatch(self.pools, slots, self._out_sizes, {self.pools.slot_of[i] for i in loaded})
