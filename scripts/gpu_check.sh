#!/usr/bin/env bash
# The whole CUDA check in one short run (at most 8 minutes: each step has its own time limit), for a bare machine with CUDA torch,
# transformers, peft and triton but no network:
#   scripts/gpu_check.sh OUTDIR [WHEELS]      (WHEELS: a folder made by scripts/gpu_wheels.sh; default ./wheels)
# It installs the project from WHEELS, runs `pytest -m gpu` (bfloat16 multi-LoRA against transformers+peft on the
# GPU, read-backs per decode step, the memory plan, the launcher on CUDA; the sharded tests when two GPUs are
# visible), then the serving benchmark on SmolLM2 in bfloat16 with and without --compile. Logs and summary.json
# go to OUTDIR; the exit status is non-zero when a step failed.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [WHEELS]}
wheels=${2:-wheels}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - start))" >> "$out/steps.txt"
    echo "   exit $rc after $((SECONDS - start))s; log: $out/$name.log"
    tail -n 3 "$out/$name.log"
}

: > "$out/steps.txt"
{ nvidia-smi || true; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
if [ -d "$wheels" ]; then  # every wheel without its dependencies (the image holds the rest: gpu_wheels.sh), and
    # the project, into a folder of their own: the image's environment may be read-only
    site=/tmp/lorax-site
    step install 90 "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$wheels"/*.whl .
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
step pytest-gpu 150 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests
# the benchmark serves the SmolLM2 demo when its wheel is installed, else SmolLM2's shape with random weights
model=()
if ! "$py" -c "from lorax_server.demo_model import demo_gguf; demo_gguf()" > /dev/null 2>&1; then
    step random-weights 60 "$py" benchmarks/random_weights.py "$wheels/smollm2-shape" /tmp/smollm2-random
    model=(--model /tmp/smollm2-random)
fi
step serving-bf16 120 "$py" benchmarks/serving.py --quick --device cuda --dtype bfloat16 "${model[@]}" \
    --json "$out/serving-bf16.json"
step serving-bf16-compile 120 "$py" benchmarks/serving.py --quick --device cuda --dtype bfloat16 "${model[@]}" \
    --launcher-arg=--compile --json "$out/serving-bf16-compile.json"

"$py" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = {name: {"exit": int(rc), "seconds": int(s)} for name, rc, s in (l.split() for l in (out / "steps.txt").read_text().splitlines())}
summary = {"gpu": (out / "gpu.txt").read_text().strip().splitlines()[-1], "steps": steps}
for name in ("serving-bf16", "serving-bf16-compile"):
    path = out / f"{name}.json"
    if path.exists():
        summary[name] = json.loads(path.read_text()).get("targets")
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
sys.exit(0 if all(s["exit"] == 0 for s in steps.values()) else 1)
PY
