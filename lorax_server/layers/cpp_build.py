"""Build a C++ op library once per machine with torch's extension builder, then load it from the cache.

The CPU kernels (LoRA, quantized linear, decode attention) are compiled where they run, so `-march=native` may use
every vector unit of this CPU; `-fopenmp` matters because `at::parallel_for` is inline OpenMP and runs serially
without it. The first build takes about a minute; `make install` and the Docker image build them ahead of time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


def load(name: str, source: Path, library: str, schemas: dict[str, str], extra_flags: tuple[str, ...] = ()) -> None:
    """Compile `source` (or load it from the cache) and register `library`'s ops: op name -> schema, each bound to
    the C++ function of the same name for CPU tensors."""
    from torch.utils import cpp_extension

    # the `ninja` wheel installs its binary beside this interpreter, which need not be on PATH (no venv activated)
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    registration = "".join(f'  m.def("{op}{schema}");\n  m.impl("{op}", torch::kCPU, &{op});\n'
                           for op, schema in schemas.items())
    code = source.read_text() + f"\nTORCH_LIBRARY({library}, m) {{\n{registration}}}\n"
    cpp_extension.load_inline(name=name, cpp_sources=[code], is_python_module=False,
                              extra_cflags=FLAGS + list(extra_flags), extra_ldflags=["-fopenmp"])
