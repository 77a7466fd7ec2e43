"""Reading model weights: safetensors files (with per-rank slicing for tensor parallelism), linear layers in float
or quantized (`--quantize`, see lorax_server.quantization), and conversion of `.bin` and `.gguf` checkpoints into
safetensors folders that the shards load."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from lorax_server.layers.linear import Linear
from lorax_server.layers.quantized import QuantizedLinear
from lorax_server.quantization.grouped import fuse_rows
from lorax_server.quantization.schemes import QuantizeAtLoad, choose_scheme

logger = logging.getLogger(__name__)


EMBEDDINGS_ENV = "LORAX_QUANTIZE_EMBEDDINGS"


def int8_embeddings(quantize: str | None) -> bool:
    """Whether LORAX_QUANTIZE_EMBEDDINGS=int8 asks for the token embedding and LM head as int8 rows. Off by default,
    as transformers keeps them in float beside bitsandbytes weights; it takes --quantize, as it trades accuracy
    (about 0.015 nats of prompt logprobs on SmolLM2) for memory and single-stream speed."""
    value = os.environ.get(EMBEDDINGS_ENV, "float").strip().lower() or "float"
    if value not in ("float", "int8"):
        raise ValueError(f"{EMBEDDINGS_ENV} must be float or int8, not {value!r}")
    if value == "int8" and not quantize:
        raise ValueError(f"{EMBEDDINGS_ENV}=int8 quantizes the embeddings of a quantized model: it needs --quantize")
    return value == "int8"


class Weights:
    """Lazy access to every tensor of a folder's `*.safetensors` files, sliced for this rank on demand.

    Each rank reads only its own slice (safetensors' get_slice), so a sharded model never holds the full
    weights in one process. `quantize` (the --quantize value) is checked against the folder's config.json at
    once, so a wrong pairing fails before any weight is read.
    """

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, rank: int = 0, world_size: int = 1,
                 quantize: str | None = None):
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {folder}")
        self.dtype, self.device, self.rank, self.world_size = dtype, device, rank, world_size
        config = Path(folder) / "config.json"
        self.scheme = choose_scheme(quantize, load_config(folder) if config.exists() else {})
        self.int8_embeddings = int8_embeddings(quantize)
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    self._where[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise KeyError(f"tensor '{name}' is missing from the checkpoint")
        return safe_open(str(self._where[name]), framework="pt").get_slice(name)

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (replicated on every rank)."""
        return self._finish(self._slice(name)[:])

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (column-parallel output features, vocab rows, biases)."""
        return self._finish(self._slice(name)[start:stop])

    def get_cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of dim 1 (row-parallel input features)."""
        return self._finish(self._slice(name)[:, start:stop])

    def raw(self, name: str) -> torch.Tensor:
        """The whole tensor as stored (dtype and device untouched): quantized codes and their statistics."""
        return self._slice(name)[:]

    def linear_rows(self, parts: list[tuple[str, int, int]]) -> Linear | QuantizedLinear:
        """A column-parallel linear: output features [start, stop) of each (module prefix, start, stop), stacked
        in order (q/k/v, gate/up fuse into one matmul)."""
        return self._linear([(prefix, "rows", start, stop) for prefix, start, stop in parts])

    def linear_cols(self, prefix: str, start: int, stop: int) -> Linear | QuantizedLinear:
        """A row-parallel linear: input features [start, stop) of the module at `prefix`."""
        return self._linear([(prefix, "cols", start, stop)])

    def _linear(self, parts: list[tuple[str, str, int, int]]) -> Linear | QuantizedLinear:
        def dense(prefix: str, axis: str, start: int, stop: int) -> torch.Tensor:
            return (self.get_rows if axis == "rows" else self.get_cols)(f"{prefix}.weight", start, stop)

        if self.scheme is None:
            return Linear(torch.cat([dense(*part) for part in parts]))
        if isinstance(self.scheme, QuantizeAtLoad):  # each rank quantizes its own float slice
            return QuantizedLinear(fuse_rows([self.scheme.quantize(dense(*part)) for part in parts]), self.device)
        stored = [self.scheme.read(self, prefix) for prefix, *_ in parts]
        if all(weight is None for weight in stored):  # modules the quantizer skipped stay in float
            return Linear(torch.cat([dense(*part) for part in parts]))
        if any(weight is None for weight in stored):
            raise ValueError(f"{', '.join(p[0] for p in parts)} are fused into one matmul, but only some are quantized")
        sliced = [w.rows(start, stop) if axis == "rows" else w.cols(start, stop)
                  for w, (_, axis, start, stop) in zip(stored, parts)]
        return QuantizedLinear(fuse_rows(sliced), self.device)


def load_config(folder: Path) -> dict:
    """config.json of a model folder as a plain dict."""
    return json.loads((Path(folder) / "config.json").read_text())


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder (config, weights, tokenizer) at `target`.

    Written to a temporary folder first and renamed, so concurrent shards never see half a conversion.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on GGUF-loaded models, so write the dequantized tensors directly.
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied lm_head
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        for attr in ("quantization_config",):
            if hasattr(config, attr):
                delattr(config, attr)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_bin_files(folder: Path) -> list[Path]:
    """Convert `pytorch_model*.bin` files of a folder to safetensors next to them (weights_only load)."""
    from safetensors.torch import save_file

    written = []
    for binfile in sorted(Path(folder).glob("pytorch_model*.bin")):
        out = binfile.with_name(binfile.name.replace("pytorch_model", "model").replace(".bin", ".safetensors"))
        if out.exists():
            continue
        state = torch.load(binfile, map_location="cpu", weights_only=True)
        seen: dict[int, str] = {}
        tensors = {}
        for name, tensor in state.items():
            ptr = tensor.data_ptr()
            if ptr in seen:  # tied weights: keep one copy (the model reties them on load)
                continue
            seen[ptr] = name
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(out), metadata={"format": "pt"})
        written.append(out)
    return written
