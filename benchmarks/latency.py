"""Single-stream latency, 32-concurrent throughput, shard memory and logprob drift per weight format, through the
real `lorax-launcher` on SmolLM2-135M (the demo model), over HTTP.

For each configuration (float32, bfloat16, every `--quantize` value that quantizes at load, alone and with
LORAX_QUANTIZE_EMBEDDINGS=int8, optionally each with `--compile`) one launcher is started as a user would, and measured in turn:
  - single stream: sequential streamed requests, tokens/s and time to first token (p50);
  - 32 concurrent requests: generated tokens/s;
  - resident memory of the shard process once warm (what the weights, cache and workspace hold);
  - drift: mean absolute difference, in nats, of the prompt logprobs of a fixed English text against float32
    (the issue's accuracy bar: 8-bit within 0.1, 4-bit within 0.3).
Ratios against float32 are printed side by side; `--json` keeps every number. GPTQ and AWQ need checkpoints that
were quantized beforehand, so they are measured only when `--gptq-model` / `--awq-model` name one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
from dataclasses import asdict
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_client import Client  # noqa: E402
from benchmarks.serving import Failures, Sizes, concurrent, launch, machine, prompts, single_stream  # noqa: E402
from lorax_server.demo_model import demo_gguf  # noqa: E402
from lorax_server.weights import EMBEDDINGS_ENV  # noqa: E402

TEXT = ("The river ran quietly past the old mill, where the miller's daughter counted sacks of flour each morning "
        "before the market opened. Travellers stopped to ask for directions, and she told them the shortest road "
        "to the city was closed for repairs, so they should follow the valley instead.")
LOAD_TIME_FORMATS = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")


def shard_rss_mib(launcher_pid: int) -> float:
    """Resident memory of the launcher's `lorax-server serve` children (all ranks), in MiB."""
    total, todo = 0, [launcher_pid]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            todo += children
            for child in children:
                try:
                    if "lorax-server" not in Path(f"/proc/{child}/cmdline").read_text():
                        continue
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:
                    continue
                total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total / 1024


def prompt_logprobs(url: str) -> list[float]:
    """Logprob of each token of TEXT given the ones before it (the first has none)."""
    body = {"inputs": TEXT, "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True}}
    response = httpx.post(url + "/generate", json=body, timeout=300)
    response.raise_for_status()
    return [t["logprob"] for t in response.json()["details"]["prefill"][1:]]


async def measure(url: str, sizes: Sizes, failures: Failures) -> dict:
    async with Client(url) as client, httpx.AsyncClient(base_url=url, timeout=600) as streams:
        await concurrent(client, [(p, None) for p in prompts(4)], 4, "warm-up", failures)
        single = await single_stream(streams, None, sizes, failures)
        many = await concurrent(client, [(p, None) for p in prompts(sizes.concurrent)], sizes.new_tokens,
                                "concurrent", failures)
    return {"single_tokens_per_s": single["tokens_per_s"], "ttft_ms_p50": single["ttft_ms_p50"],
            "concurrent_tokens_per_s": many}


def configurations(args: argparse.Namespace) -> list[tuple[str, str, list[str], str | None, dict]]:
    """(label, dtype, launcher flags, model override, environment) for every configuration to run."""
    base = [("float32", "float32", [], None, {}), ("bfloat16", "bfloat16", [], None, {})]
    base += [(q, "float32", ["--quantize", q], None, {}) for q in LOAD_TIME_FORMATS]
    base += [(f"{q} int8-embeddings", "float32", ["--quantize", q], None, {EMBEDDINGS_ENV: "int8"})
             for q in LOAD_TIME_FORMATS]
    base += [(q, "float32", ["--quantize", q], m, {}) for q, m in (("gptq", args.gptq_model), ("awq", args.awq_model))
             if m]
    if args.compile:
        base += [(f"{label} --compile", dtype, [*flags, "--compile"], m, env) for label, dtype, flags, m, env in base]
    return base


def report(rows: dict[str, dict]) -> None:
    ref = rows["float32"]
    print(f"\n{'configuration':26s} {'1-stream t/s':>12s} {'TTFT ms':>8s} {'32-conc t/s':>11s} {'shard MiB':>9s} "
          f"{'drift nats':>10s}  ratios vs float32 (1-stream, 32-conc, memory)")
    for label, n in rows.items():
        ratios = (n["single_tokens_per_s"] / ref["single_tokens_per_s"],
                  n["concurrent_tokens_per_s"] / ref["concurrent_tokens_per_s"], n["shard_rss_mib"] / ref["shard_rss_mib"])
        print(f"{label:26s} {n['single_tokens_per_s']:12.1f} {n['ttft_ms_p50']:8.0f} {n['concurrent_tokens_per_s']:11.1f} "
              f"{n['shard_rss_mib']:9.0f} {n['drift_nats']:10.3f}  " + ", ".join(f"{r:.2f}" for r in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests (a smoke test)")
    parser.add_argument("--compile", action="store_true", help="also run every configuration with --compile")
    parser.add_argument("--gptq-model", help="a GPTQ-quantized checkpoint of the same model, to include --quantize gptq")
    parser.add_argument("--awq-model", help="an AWQ-quantized checkpoint of the same model, to include --quantize awq")
    parser.add_argument("--only", action="append", help="run only these configuration labels (repeatable)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    sizes = Sizes(concurrent=8, new_tokens=16, single=2) if args.quick else Sizes(concurrent=32, new_tokens=64, single=6)
    gguf = str(demo_gguf())
    work = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    failures, rows, reference = Failures(), {}, None
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores", flush=True)
    try:
        for label, dtype, flags, model, env in configurations(args):
            if args.only and label not in args.only and label != "float32":
                continue
            print(f"{label}: starting the launcher", flush=True)
            launcher = launch(model or gguf, work, dtype, "cpu", *flags, "--max-concurrent-requests", "256", env=env)
            try:
                numbers = asyncio.run(measure(launcher.url, sizes, failures))
                numbers["shard_rss_mib"] = shard_rss_mib(launcher.proc.pid)
                logprobs = prompt_logprobs(launcher.url)
            finally:
                launcher.stop()
            reference = reference or logprobs
            numbers["drift_nats"] = statistics.fmean(abs(a - b) for a, b in zip(logprobs, reference))
            rows[label] = numbers
            print(f"  {numbers}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows)
    bad = {k: v for k, v in failures.counts.items() if v}
    print("non-200 answers: " + (", ".join(f"{k} {v}" for k, v in bad.items()) or "none"))
    if args.json:
        args.json.write_text(json.dumps({**info, "sizes": asdict(sizes),
                                         "configurations": rows, "failures": failures.counts}, indent=2))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
