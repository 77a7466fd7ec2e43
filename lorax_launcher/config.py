"""The launcher's validated, immutable configuration.

Every cross-flag rule is checked here, once, before anything is spawned: a bad combination fails in a second
with one line naming the flags, instead of minutes later inside a shard.
"""
from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from lorax_launcher.logs import log

# The documented defaults of the three token limits; used as ceilings/floors when they are derived.
DEFAULT_MAX_TOTAL_TOKENS = 2048
DEFAULT_MAX_INPUT_LENGTH = 1792
DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096
MODEL_LIMIT_CAP = 4096
MODEL_LIMIT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions")
ANY_ADDRESS = "0.0.0.0"


class ConfigError(Exception):
    """A flag combination that cannot work; `variant` is the `Error: <variant>` the launcher exits with."""

    def __init__(self, message: str, variant: str = "ArgumentValidation") -> None:
        super().__init__(message)
        self.variant = variant


@dataclass(frozen=True)
class LauncherConfig:
    """Everything the launcher needs, after splitting, deriving and validating the flags."""

    model_id: str
    revision: str | None
    adapter_id: str
    source: str
    adapter_source: str
    validation_workers: int
    num_shard: int
    quantize: str | None
    compile: bool
    dtype: str | None
    trust_remote_code: bool
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    waiting_served_ratio: float
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int | None
    max_waiting_tokens: int
    max_active_adapters: int
    adapter_cycle_time_s: int
    hostname: str
    port: int
    shard_uds_path: str
    master_addr: str
    master_port: int
    huggingface_hub_cache: str | None
    weights_cache_override: str | None
    disable_custom_kernels: bool
    cuda_memory_fraction: float
    json_output: bool
    otlp_endpoint: str | None
    cors_allow_origin: str | None
    watermark_gamma: float | None
    watermark_delta: float | None
    ngrok: bool
    ngrok_authtoken: str | None
    ngrok_edge: str | None
    download_only: bool

    def shard_socket(self, rank: int) -> str:
        """The socket file shard `rank` serves on; it appears once the shard is ready."""
        return f"{self.shard_uds_path}-{rank}"


def build_config(options: Mapping[str, Any], environ: Mapping[str, str]) -> LauncherConfig:
    """Validate the parsed options and derive what was left out; raises ConfigError.

    The three token limits are None in `options` when the user did not give them.
    """
    values = {f.name: options[f.name] for f in fields(LauncherConfig) if f.name in options}
    values["model_id"], values["revision"] = split_model_id(options["model_id"], options["revision"])
    if options["validation_workers"] <= 0:
        raise ConfigError("--validation-workers must be > 0")
    values["max_input_length"], values["max_total_tokens"], values["max_batch_prefill_tokens"] = token_limits(
        model_limit(values["model_id"]), options["max_input_length"], options["max_total_tokens"],
        options["max_batch_prefill_tokens"], options["max_batch_total_tokens"])
    check_quantize(options["quantize"], options["dtype"])
    values["num_shard"] = find_num_shards(options["sharded"], options["num_shard"], environ)
    check_ngrok(options["ngrok"], options["ngrok_authtoken"], options["ngrok_edge"])
    values["hostname"] = bindable_host(options["hostname"])
    return LauncherConfig(**values)


def split_model_id(model_id: str, revision: str | None) -> tuple[str, str | None]:
    """`org/model@rev` -> (`org/model`, `rev`); an existing local path is never split."""
    if "@" not in model_id or Path(model_id).exists():
        return model_id, revision
    if revision:
        raise ConfigError(f"Cannot specify a revision in both --model-id ({model_id}) and --revision ({revision})")
    name, rev = model_id.split("@", 1)
    return name, rev or None


def model_limit(model_id: str) -> int:
    """The model's context length from a local folder's config.json, capped; the cap when unknown."""
    try:
        config = json.loads((Path(model_id) / "config.json").read_text())
    except (OSError, ValueError):
        return MODEL_LIMIT_CAP
    for key in MODEL_LIMIT_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return min(value, MODEL_LIMIT_CAP)
    return MODEL_LIMIT_CAP


def token_limits(limit: int, max_input_length: int | None, max_total_tokens: int | None,
                 max_batch_prefill_tokens: int | None, max_batch_total_tokens: int | None) -> tuple[int, int, int]:
    """(max_input_length, max_total_tokens, max_batch_prefill_tokens): given values win, the rest derived.

    Derived values stay within the documented defaults, the model's limit and a given --max-batch-total-tokens.
    """
    batch = max_batch_total_tokens if max_batch_total_tokens is not None else math.inf
    total = max_total_tokens if max_total_tokens is not None else min(DEFAULT_MAX_TOTAL_TOKENS, limit, batch)
    inputs = max_input_length if max_input_length is not None else max(0, min(DEFAULT_MAX_INPUT_LENGTH, total - 1))
    prefill = (max_batch_prefill_tokens if max_batch_prefill_tokens is not None
               else max(min(DEFAULT_MAX_BATCH_PREFILL_TOKENS, batch), inputs))

    def shown(flag: str, value: int, given: int | None) -> str:
        return f"{flag} ({value})" if given is not None else f"{flag} ({value}, derived: set it explicitly)"

    mil = shown("--max-input-length", inputs, max_input_length)
    mtt = shown("--max-total-tokens", total, max_total_tokens)
    mbpt = shown("--max-batch-prefill-tokens", prefill, max_batch_prefill_tokens)
    if inputs >= total:
        raise ConfigError(f"{mil} must be < {mtt}")
    if prefill < inputs:
        raise ConfigError(f"{mbpt} must be >= {mil}")
    if max_batch_total_tokens is not None:
        mbtt = f"--max-batch-total-tokens ({max_batch_total_tokens})"
        if total > max_batch_total_tokens:
            raise ConfigError(f"{mtt} must be <= {mbtt}")
        if prefill > max_batch_total_tokens:
            raise ConfigError(f"{mbpt} must be <= {mbtt}")
    return inputs, total, prefill


def check_quantize(quantize: str | None, dtype: str | None) -> None:
    """--quantize fixes the weights' storage and the activations stay in the device's default dtype, so the two
    flags exclude each other. Whether the checkpoint suits the value is checked by the shard, which reads it."""
    if quantize and dtype:
        raise ConfigError(f"--dtype ({dtype}) cannot be used with --quantize ({quantize})")


def visible_devices(environ: Mapping[str, str]) -> int | None:
    """How many GPUs CUDA_VISIBLE_DEVICES (else NVIDIA_VISIBLE_DEVICES) lists; None when neither is set."""
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if var in environ:
            return len([d for d in environ[var].split(",") if d.strip()])
    return None


def find_num_shards(sharded: bool | None, num_shard: int | None, environ: Mapping[str, str]) -> int:
    """The world size from --sharded, --num-shard and the visible GPUs."""
    if num_shard is not None and num_shard < 1:
        raise ConfigError(f"--num-shard must be >= 1 (got {num_shard})")
    if sharded is True:
        if num_shard is not None:
            if num_shard == 1:
                raise ConfigError("--sharded true cannot be used with --num-shard 1")
            return num_shard
        devices = visible_devices(environ)
        if devices is None:
            raise ConfigError("--sharded true without --num-shard needs CUDA_VISIBLE_DEVICES or "
                              "NVIDIA_VISIBLE_DEVICES to count the GPUs")
        if devices <= 1:
            raise ConfigError(f"--sharded true needs more than one GPU, but only {devices} is visible",
                              "NotEnoughCUDADevices")
        return devices
    if sharded is False:
        if num_shard is not None and num_shard > 1:
            raise ConfigError(f"--sharded false cannot be used with --num-shard {num_shard}")
        return 1
    if num_shard is not None:
        return num_shard
    return visible_devices(environ) or 1


def check_ngrok(ngrok: bool, authtoken: str | None, edge: str | None) -> None:
    """--ngrok is useless without both its token and its edge."""
    missing = [flag for flag, value in (("--ngrok-authtoken", authtoken), ("--ngrok-edge", edge)) if not value]
    if ngrok and missing:
        raise ConfigError(f"--ngrok requires {' and '.join(missing)}")


def bindable_host(hostname: str) -> str:
    """`hostname` when this machine can listen on it, else 0.0.0.0 with a warning.

    Docker and Kubernetes export HOSTNAME as the container's name, which is often not an address at all.
    """
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        log.warning("--hostname %r does not resolve; listening on %s instead", hostname, ANY_ADDRESS)
        return ANY_ADDRESS
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((address[0], 0, *address[2:]))
            return hostname
        except OSError:
            continue
    log.warning("--hostname %r is not an address of this machine; listening on %s instead", hostname, ANY_ADDRESS)
    return ANY_ADDRESS
