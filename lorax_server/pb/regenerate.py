"""Regenerate the gRPC Python code from proto/generate.proto (the one command: `make proto`).

The generated files are committed so that installing the server needs no protoc; a test regenerates them
into a temporary folder and fails when the committed copies are stale.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
PB_DIR = Path(__file__).resolve().parent
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc on generate.proto into `out_dir`, with package-relative imports."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "generate.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on generate.proto")
    grpc_file = out_dir / "generate_pb2_grpc.py"
    text = grpc_file.read_text()
    text = re.sub(r"^import generate_pb2 as", "from . import generate_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [n for n in GENERATED if (Path(tmp) / n).read_text() != (PB_DIR / n).read_text()]


if __name__ == "__main__":
    generate(PB_DIR)
    print(f"regenerated {', '.join(GENERATED)} in {PB_DIR}", file=sys.stderr)
