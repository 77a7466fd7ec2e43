"""Local models: a folder saved by `save_pretrained`, or a `.gguf` file (converted once into the cache)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def as_local_path(model_id: str) -> Path | None:
    """`model_id` as a filesystem path when it names one that exists, else None."""
    path = Path(model_id).expanduser()
    return path.resolve() if path.exists() else None


def find_gguf(path: Path) -> Path | None:
    """The .gguf file `path` names, or the only one inside a folder that has no safetensors."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if any(path.glob("*.safetensors")):
        return None
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def converted_dir(gguf: Path, cache: Path) -> Path:
    """Where the safetensors conversion of `gguf` lives: keyed by its absolute path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / "lorax-converted" / f"{gguf.stem}-{key}"


def locate(path: Path, cache: Path) -> Path:
    """The folder to load for a local path; a .gguf must already have been converted."""
    from lorax_server.sources import ModelNotFound

    gguf = find_gguf(path)
    if gguf is None:
        if not path.is_dir():
            raise ModelNotFound(f"'{path}' is neither a model folder nor a .gguf file")
        return path
    target = converted_dir(gguf, cache)
    if not (target / "config.json").exists():
        raise ModelNotFound(f"'{gguf}' has not been converted yet (run `lorax-server download-weights {gguf}`)")
    return target


def prepare(path: Path, cache: Path) -> Path:
    """Like `locate`, converting a .gguf file to safetensors first when needed."""
    gguf = find_gguf(path)
    if gguf is None:
        return locate(path, cache)
    from lorax_server.weights import convert_gguf

    target = converted_dir(gguf, cache)
    if not (target / "config.json").exists():
        convert_gguf(gguf, target)
    return target
