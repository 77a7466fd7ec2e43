"""Assemble one shard: resolve the model folder, load weights and tokenizer, wrap them in the gRPC service."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from lorax_server import cuda_graphs
from lorax_server.adapters.registry import AdapterKey, AdapterRegistry
from lorax_server.cpu_memory import reuse_freed_memory
from lorax_server.dist import Parallel
from lorax_server.generation import Generator, eos_token_ids
from lorax_server.models import implementation, load_model
from lorax_server.server import LoraxService
from lorax_server.sources import locate_model

logger = logging.getLogger(__name__)


def build_service(
    model_id: str, revision: str | None, source: str, dtype: str | None, parallel: Parallel, device: torch.device,
    uds_path: str, adapter_id: str = "", adapter_source: str = "hub", worker: ThreadPoolExecutor | None = None,
    trust_remote_code: bool = False, quantize: str | None = None, cuda_graphs_on: bool = False,
) -> LoraxService:
    """A ready service; a static `adapter_id` is loaded at index 0, so it applies to requests naming none.
    Call it on `worker`, the model thread the service will run its tensor work on. `trust_remote_code` lets a model
    on the transformers-backed path (and its tokenizer) run code shipped with the checkpoint. `cuda_graphs_on`
    (--compile on CUDA): decode steps replay CUDA graphs where the model allows (`cuda_graphs.py`)."""
    from transformers import AutoTokenizer

    if device.type == "cpu":
        reuse_freed_memory()
    folder = locate_model(model_id, revision, source)
    logger.info("loading %s from %s on %s (rank %d/%d)", model_id, folder, device, parallel.rank, parallel.world_size)
    model = load_model(folder, dtype, device, parallel, trust_remote_code, quantize)
    path = implementation(model)
    logger.info("%s runs on the %s path", model_id, path)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code and path == "transformers")
    adapters = AdapterRegistry(model, device, model_id=model_id)
    if adapter_id:
        adapters.load(AdapterKey((adapter_id,), adapter_source), 0, trusted=True)
    graphs = cuda_graphs.from_env(model, adapters, parallel, device) if cuda_graphs_on else None
    generator = Generator(model, tokenizer, eos_token_ids(folder, tokenizer), parallel, device, adapters, graphs)
    return LoraxService(generator, parallel, uds_path, worker)
