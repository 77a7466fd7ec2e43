#!/usr/bin/env bash
# Run on a machine with network access: fills DIR with the wheels that scripts/gpu_check.sh installs on the offline
# GPU machine (Python 3.12, x86_64 Linux). That machine's image already holds CUDA torch, triton, transformers, peft
# and about 200 other packages (scripts/gpu_image_packages.txt), so those are left out, except grpcio and protobuf,
# whose versions the generated gRPC code needs. What remains is about 55 MB: the working tree that travels to the
# device machine may hold 64 MiB, so the SmolLM2 demo model (93 MB) cannot come along, and gpu_check.sh skips the
# serving benchmark without it.
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
echo "wheels for scripts/gpu_check.sh are in $dir ($(du -sh "$dir" | cut -f1))"
