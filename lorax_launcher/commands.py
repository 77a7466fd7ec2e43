"""The command lines and environments of the launcher's children, as pure functions of the config.

Kept free of side effects so that what each flag turns into can be checked without spawning anything.
"""
from __future__ import annotations

from typing import Mapping

from lorax_launcher.config import LauncherConfig

SERVER = "lorax-server"
ROUTER = "lorax-router"


def download_command(cfg: LauncherConfig) -> list[str]:
    """`lorax-server download-weights ...`: fetch the model (and the static adapter) into the cache."""
    cmd = [SERVER, "download-weights", cfg.model_id, "--source", cfg.source, "--adapter-source", cfg.adapter_source]
    if cfg.revision:
        cmd += ["--revision", cfg.revision]
    if cfg.adapter_id:
        cmd += ["--adapter-id", cfg.adapter_id]
    cmd += ["--logger-level", "INFO"]
    if cfg.json_output:
        cmd.append("--json-output")
    return cmd


def shard_command(cfg: LauncherConfig, model_path: str) -> list[str]:
    """`lorax-server serve ...` for every rank; the rank itself travels in the environment."""
    cmd = [SERVER, "serve", model_path, "--uds-path", cfg.shard_uds_path, "--source", cfg.source,
           "--adapter-source", cfg.adapter_source, "--logger-level", "INFO"]
    if cfg.json_output:
        cmd.append("--json-output")
    if cfg.adapter_id:
        cmd += ["--adapter-id", cfg.adapter_id]
    if cfg.revision:
        cmd += ["--revision", cfg.revision]
    if cfg.num_shard > 1:
        cmd.append("--sharded")
    if cfg.quantize:
        cmd += ["--quantize", cfg.quantize]
    if cfg.compile:
        cmd.append("--compile")
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    if cfg.trust_remote_code:
        cmd.append("--trust-remote-code")
    if cfg.otlp_endpoint:
        cmd += ["--otlp-endpoint", cfg.otlp_endpoint]
    return cmd


def router_command(cfg: LauncherConfig, tokenizer_name: str) -> list[str]:
    """`lorax-router ...`: serves HTTP on --hostname/--port and talks to the shards through rank 0's socket."""
    cmd = [ROUTER,
           "--max-concurrent-requests", str(cfg.max_concurrent_requests),
           "--max-best-of", str(cfg.max_best_of),
           "--max-stop-sequences", str(cfg.max_stop_sequences),
           "--max-input-length", str(cfg.max_input_length),
           "--max-total-tokens", str(cfg.max_total_tokens),
           "--max-batch-prefill-tokens", str(cfg.max_batch_prefill_tokens),
           "--max-active-adapters", str(cfg.max_active_adapters),
           "--adapter-cycle-time-s", str(cfg.adapter_cycle_time_s),
           "--waiting-served-ratio", str(cfg.waiting_served_ratio),
           "--max-waiting-tokens", str(cfg.max_waiting_tokens),
           "--validation-workers", str(cfg.validation_workers),
           "--hostname", cfg.hostname,
           "--port", str(cfg.port),
           "--master-shard-uds-path", cfg.shard_socket(0),
           "--tokenizer-name", tokenizer_name,
           "--model-id", cfg.model_id,
           "--adapter-source", cfg.adapter_source]
    if cfg.max_batch_total_tokens is not None:
        cmd += ["--max-batch-total-tokens", str(cfg.max_batch_total_tokens)]
    if cfg.revision:
        cmd += ["--revision", cfg.revision]
    if cfg.json_output:
        cmd.append("--json-output")
    if cfg.otlp_endpoint:
        cmd += ["--otlp-endpoint", cfg.otlp_endpoint]
    if cfg.cors_allow_origin:
        cmd += ["--cors-allow-origin", cfg.cors_allow_origin]
    if cfg.ngrok:
        cmd += ["--ngrok", "--ngrok-authtoken", cfg.ngrok_authtoken or "", "--ngrok-edge", cfg.ngrok_edge or ""]
    return cmd


def _common(environ: Mapping[str, str]) -> dict[str, str]:
    """Every child: the inherited environment, unbuffered output (its log lines show up as they happen) and
    the hub token."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    token = environ.get("HF_API_TOKEN")
    if token:
        env["HUGGING_FACE_HUB_TOKEN"] = token
    return env


def download_env(cfg: LauncherConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The common environment plus where the weights go."""
    env = {**_common(environ), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if cfg.huggingface_hub_cache:
        env["HUGGINGFACE_HUB_CACHE"] = cfg.huggingface_hub_cache
    if cfg.weights_cache_override:
        env["WEIGHTS_CACHE_OVERRIDE"] = cfg.weights_cache_override
    return env


def shard_env(cfg: LauncherConfig, rank: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The download environment plus the torch.distributed rendezvous and the per-shard tuning knobs."""
    env = download_env(cfg, environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(cfg.num_shard), MASTER_ADDR=cfg.master_addr,
               MASTER_PORT=str(cfg.master_port), NCCL_ASYNC_ERROR_HANDLING="1",
               CUDA_MEMORY_FRACTION=str(cfg.cuda_memory_fraction))
    if cfg.disable_custom_kernels:
        env["DISABLE_CUSTOM_KERNELS"] = "True"
    if cfg.watermark_gamma is not None:
        env["WATERMARK_GAMMA"] = str(cfg.watermark_gamma)
    if cfg.watermark_delta is not None:
        env["WATERMARK_DELTA"] = str(cfg.watermark_delta)
    return env


def router_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The common environment (the router may fetch tokenizer files from the hub)."""
    return _common(environ)
