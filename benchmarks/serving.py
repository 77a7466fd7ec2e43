"""Multi-LoRA serving benchmark: the real `lorax-launcher` on SmolLM2-135M (the demo model), driven over HTTP.

Starts `lorax-launcher` as a user does (subprocess on 127.0.0.1, free port) and sends requests with an async
client, every request with `ignore_eos_token` and greedy decoding. Random PEFT adapters are written to a work folder
(`benchmarks/adapters.py`) that is the launcher's LORAX_LOCAL_ADAPTER_ROOTS; requests name them by absolute path.

(a) 32 concurrent requests on the base model                      generated tokens/s (64 new tokens each)
(b) 32 concurrent requests on 32 distinct r=8 q,v adapters
(c) 32 concurrent requests on 32 adapters of a published-like mix (ranks 8-64, q,v / q,k,v,o / all 7 / MLP only)
(d) 128 concurrent requests on 128 distinct r=8 adapters, vs 128 concurrent on the base model
(e) churn: a Zipf(1.1) stream over 1000 adapters on disk, 32 closed-loop clients, its own launcher with
    --max-active-adapters 32 (loading counts), vs the same stream on the base model
(f) cold-adapter latency: an 8-token request on an adapter never used before, minus the same request warm
(g) single stream: one /generate_stream request at a time, tokens/s and client-side time to first token
(h) ceilings, in this process while no launcher runs: the shard's engine on (a)'s and (b)'s batches, the base
    weight matmuls alone at batch 32, transformers+peft mixed-adapter batch and one request at a time
    (the latter on the first 8 prompts: its tokens/s does not depend on how many)

(a)-(d) run in interleaved rounds (each keeps its best) on one launcher, after a warm-up that loads every adapter.
Both launchers get --max-concurrent-requests 256, so admission control never refuses (d)'s 128 requests.
Prints the machine, a table with each ratio and its target, and writes every number to --json. Exits 1 if any
request did not answer 200 (targets missed are reported, not fatal). Expect roughly 10 minutes on 2 CPU cores
(the 1000 adapters take about 1.8 GB in a temporary folder, removed at the end unless --keep); --quick shrinks
every scenario for a smoke test (about 3 minutes; its ratios mean little at its sizes).

Usage: python benchmarks/serving.py [--quick] [--rounds 3] [--dtype float32|bfloat16] [--model FOLDER] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.adapters import PUBLISHED_MIX, QV8, Spec, write_adapters  # noqa: E402
from benchmarks.http_client import Client  # noqa: E402
from lorax_server.demo_model import demo_gguf  # noqa: E402
from lorax_server.pb import generate_pb2  # noqa: E402
from lorax_server.sources import cache_dir, fetch_model  # noqa: E402
from tests.e2e import Launcher  # noqa: E402

TEXT = ("Explain briefly why the sky looks blue during the day and red at sunset, how rainbows form after the rain, "
        "why the sea tastes of salt, what makes thunder so loud, and how migrating birds find their way south every "
        "winter without a map").split()


@dataclass(frozen=True)
class Sizes:
    concurrent: int = 32      # (a), (b), (c), (h)
    wide: int = 128           # (d)
    new_tokens: int = 64
    churn_adapters: int = 1000
    churn_requests: int = 256
    churn_clients: int = 32
    churn_active: int = 32
    churn_new_tokens: int = 32
    cold: int = 12
    cold_new_tokens: int = 8
    single: int = 6           # (g): sequential streamed requests per case
    peft_serial: int = 8      # (h): prompts for peft one at a time


QUICK = Sizes(concurrent=8, wide=16, new_tokens=16, churn_adapters=48, churn_requests=48, churn_clients=8,
              churn_active=8, churn_new_tokens=8, cold=4, single=2, peft_serial=2)


@dataclass
class Result:
    """What the client saw of one request."""

    status: int  # HTTP status; 0 when the request raised, -1 for an error event in a 200 stream
    tokens: int = 0
    seconds: float = 0.0
    ttft: float = 0.0


@dataclass
class Failures:
    """Non-200 answers per scenario, with the first few reasons."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def check(self, scenario: str, results: list[Result], reasons: list[str]) -> None:
        bad = [r for r in results if r.status != 200]
        self.counts[scenario] = self.counts.get(scenario, 0) + len(bad)
        self.samples += [f"{scenario}: {reason}" for reason in reasons][: max(0, 5 - len(self.samples))]


def prompts(n: int) -> list[str]:
    """`n` prompts of about 10-40 tokens, varied."""
    return [f"Question {i}: " + " ".join(TEXT[i % 7: i % 7 + 6 + (i * 7) % 27]) for i in range(n)]


def body(prompt: str, adapter: str | None, new_tokens: int) -> dict:
    params = {"max_new_tokens": new_tokens, "ignore_eos_token": True, "details": True}
    if adapter:
        params.update(adapter_id=adapter, adapter_source="local")
    return {"inputs": prompt, "parameters": params}


async def generate(client: Client, prompt: str, adapter: str | None, new_tokens: int, reasons: list[str]) -> Result:
    start = time.perf_counter()
    try:
        response = await client.post("/generate", body(prompt, adapter, new_tokens))
    except (OSError, asyncio.IncompleteReadError) as exc:
        reasons.append(repr(exc))
        return Result(0)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        reasons.append(f"{response.status_code} {response.text[:200]}")
        return Result(response.status_code, seconds=seconds)
    return Result(200, response.json()["details"]["generated_tokens"], seconds)


async def stream(client: httpx.AsyncClient, prompt: str, adapter: str | None, new_tokens: int,
                 reasons: list[str]) -> Result:
    """One /generate_stream request: tokens, total seconds and time to the first token event."""
    start, ttft, tokens = time.perf_counter(), 0.0, 0
    try:
        async with client.stream("POST", "/generate_stream", json=body(prompt, adapter, new_tokens)) as response:
            if response.status_code != 200:
                reasons.append(f"{response.status_code} {(await response.aread())[:200]!r}")
                return Result(response.status_code)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    reasons.append(f"stream error {event}")
                    return Result(-1)
                if event.get("token"):
                    tokens += 1
                    ttft = ttft or time.perf_counter() - start
    except httpx.HTTPError as exc:
        reasons.append(repr(exc))
        return Result(0)
    return Result(200, tokens, time.perf_counter() - start, ttft)


async def concurrent(client: Client, jobs: list[tuple[str, str | None]], new_tokens: int,
                     scenario: str, failures: Failures) -> float:
    """Send every job at once; generated tokens/s from the first send to the last answer."""
    reasons: list[str] = []
    start = time.perf_counter()
    results = await asyncio.gather(*(generate(client, p, a, new_tokens, reasons) for p, a in jobs))
    elapsed = time.perf_counter() - start
    failures.check(scenario, results, reasons)
    return sum(r.tokens for r in results) / elapsed


async def closed_loop(client: Client, jobs: list[tuple[str, str | None]], new_tokens: int, clients: int,
                      scenario: str, failures: Failures) -> float:
    """`clients` clients, each sending its next job when its last one answers; generated tokens/s."""
    queue, results, reasons = list(reversed(jobs)), [], []

    async def client_loop() -> None:
        while queue:
            prompt, adapter = queue.pop()
            results.append(await generate(client, prompt, adapter, new_tokens, reasons))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    failures.check(scenario, results, reasons)
    return sum(r.tokens for r in results) / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def zipf_stream(n_items: int, n_draws: int, s: float = 1.1, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return rng.choices(range(n_items), weights=[1 / (k + 1) ** s for k in range(n_items)], k=n_draws)


async def warm_up(client: Client, adapters: list[str], failures: Failures, chunk: int = 32) -> None:
    """A few base requests, then one short request per adapter (`chunk` at a time), so loading is done."""
    await concurrent(client, [(p, None) for p in prompts(chunk)], 4, "warm-up", failures)
    for i in range(0, len(adapters), chunk):
        part = adapters[i: i + chunk]
        await concurrent(client, list(zip(prompts(len(part)), part)), 2, "warm-up", failures)


async def shared_scenarios(url: str, sizes: Sizes, rounds: int, qv: list[str], mix: list[str],
                           failures: Failures) -> dict:
    """(a), (b), (c), (d) in interleaved rounds, then (f) and (g), all on the launcher at `url`."""
    texts, wide_texts = prompts(sizes.concurrent), prompts(sizes.wide)
    cases = {
        "a": ([(p, None) for p in texts], sizes.new_tokens),
        "b": (list(zip(texts, qv)), sizes.new_tokens),
        "c": (list(zip(texts, mix)), sizes.new_tokens),
        "d_base": ([(p, None) for p in wide_texts], sizes.new_tokens),
        "d": (list(zip(wide_texts, qv)), sizes.new_tokens),
    }
    out: dict = {key: 0.0 for key in cases}
    async with Client(url) as client, httpx.AsyncClient(base_url=url, timeout=600) as streams:
        await warm_up(client, qv[: sizes.wide] + mix, failures)
        await concurrent(client, cases["a"][0], sizes.new_tokens, "warm-up", failures)
        for r in range(rounds):
            for key, (jobs, new_tokens) in cases.items():
                out[key] = max(out[key], await concurrent(client, jobs, new_tokens, key, failures))
                print(f"  round {r + 1} ({key}) {out[key]:8.1f} tokens/s (best so far)", flush=True)
        out["f"] = await cold_latency(client, qv[sizes.wide: sizes.wide + sizes.cold], sizes.cold_new_tokens, failures)
        out["g"] = {case: await single_stream(streams, adapter, sizes, failures)
                    for case, adapter in (("base", None), ("r8 adapter", qv[0]))}
    return out


async def cold_latency(client: Client, adapters: list[str], new_tokens: int, failures: Failures) -> dict:
    """Latency of a request on a never-used adapter, and of the same request once the adapter is loaded."""
    cold, warm, reasons = [], [], []
    prompt = prompts(1)[0]
    for adapter in adapters:
        first = await generate(client, prompt, adapter, new_tokens, reasons)
        again = [await generate(client, prompt, adapter, new_tokens, reasons) for _ in range(2)]
        failures.check("f", [first, *again], reasons)
        reasons.clear()
        cold.append(first.seconds)
        warm.append(min(r.seconds for r in again))
    added = [(c - w) * 1000 for c, w in zip(cold, warm)]
    return {"cold_ms_p50": 1000 * statistics.median(cold), "warm_ms_p50": 1000 * statistics.median(warm),
            "added_ms_p50": percentile(added, 0.5), "added_ms_p95": percentile(added, 0.95), "added_ms": added}


async def single_stream(client: httpx.AsyncClient, adapter: str | None, sizes: Sizes, failures: Failures) -> dict:
    reasons: list[str] = []
    results = [await stream(client, p, adapter, sizes.new_tokens, reasons) for p in prompts(sizes.single)]
    failures.check("g", results, reasons)
    ok = [r for r in results if r.status == 200] or [Result(0, 0, 1.0)]
    return {"tokens_per_s": sum(r.tokens for r in ok) / sum(r.seconds for r in ok),
            "ttft_ms_p50": 1000 * statistics.median(r.ttft for r in ok)}


async def churn(url: str, sizes: Sizes, pool: list[str], failures: Failures) -> dict:
    """(e): the same Zipf stream of requests on the base model, then over the adapter pool (loading included)."""
    texts = prompts(sizes.churn_requests)
    picks = zipf_stream(len(pool), sizes.churn_requests)
    async with Client(url) as client:
        await warm_up(client, [], failures)
        base = await closed_loop(client, [(p, None) for p in texts], sizes.churn_new_tokens, sizes.churn_clients,
                                 "e_base", failures)
        print(f"  (e) base stream {base:8.1f} tokens/s", flush=True)
        adapters = await closed_loop(client, [(p, pool[i]) for p, i in zip(texts, picks)], sizes.churn_new_tokens,
                                     sizes.churn_clients, "e", failures)
        print(f"  (e) adapter stream {adapters:8.1f} tokens/s", flush=True)
    return {"e_base": base, "e": adapters, "e_distinct_adapters": len(set(picks))}


def launch(model: str, work: Path, dtype: str, device: str, *args: str, env: dict | None = None) -> Launcher:
    """A ready launcher serving `model`, with the shared weights cache and `work/adapters` as local adapter root;
    `env` adds to its environment."""
    extra = ["--dtype", dtype] if dtype != "float32" else []  # float32 is the CPU default (and not a --dtype choice)
    env = {"HUGGINGFACE_HUB_CACHE": str(cache_dir()), "LORAX_LOCAL_ADAPTER_ROOTS": str(work / "adapters"),
           "CUDA_VISIBLE_DEVICES": "0" if device == "cuda" else "", **(env or {})}
    launcher = Launcher(model, work, *extra, *args, env=env)
    try:
        return launcher.wait_ready(timeout=600)
    except BaseException:
        launcher.stop()
        raise


def run_engine(generator, texts: list[str], adapter_indices: list[int], new_tokens: int) -> float:
    """Tokens/s of our engine serving all requests in one continuous batch."""
    tok = generator.tokenizer
    requests = []
    for i, (text, index) in enumerate(zip(texts, adapter_indices)):
        ids = tok(text)["input_ids"]
        requests.append(generate_pb2.Request(
            id=i, inputs=text, tokenized_inputs=generate_pb2.TokenizedInputs(ids=ids), truncate=len(ids),
            adapter_index=index,
            parameters=generate_pb2.NextTokenChooserParameters(
                temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
            stopping_parameters=generate_pb2.StoppingCriteriaParameters(
                max_new_tokens=new_tokens, ignore_eos_token=True)))
    start = time.perf_counter()
    _, batch = generator.prefill(generator.new_batch(generate_pb2.Batch(id=0, requests=requests)))
    while batch is not None:
        _, batch = generator.decode([batch])
    return len(texts) * new_tokens / (time.perf_counter() - start)


def matmul_floor(model, requests: int, new_tokens: int) -> float:
    """Tokens/s of decode steps that do nothing but multiply `requests` rows by every base weight."""
    layer = model.layers[0]
    like = dict(dtype=model.dtype, device=model.device)
    hidden = torch.randn(requests, model.cfg.hidden_size, **like)
    attn = torch.randn(requests, layer.q_size, **like)
    inter = torch.randn(requests, layer.inter, **like)
    start = time.perf_counter()
    for _ in range(new_tokens):
        for layer in model.layers:
            layer.qkv(hidden), layer.o(attn), layer.gate_up(hidden), layer.down(inter)
        model.lm_head(hidden)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return requests * new_tokens / (time.perf_counter() - start)


def ceilings(
    folder: Path, dtype: str, device: torch.device, texts: list[str], adapters: list[str], sizes: Sizes, rounds: int
) -> dict:
    """(h), in this process: the shard's engine, the base matmuls alone, and transformers+peft, interleaved rounds."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorax_server.adapters.registry import AdapterKey
    from lorax_server.dist import Parallel
    from lorax_server.shard import build_service

    generator = build_service(str(folder), None, "hub", dtype, Parallel(), device, "/unused").generator
    generator.allocate_cache(len(texts) * (48 + sizes.new_tokens) * 2)
    for i, path in enumerate(adapters):
        generator.adapters.load(AdapterKey((path,), "local"), i + 1, trusted=True)

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval().to(device)
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(texts))]
    gen_args = dict(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, do_sample=False)

    def peft_mixed() -> float:
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
        start = time.perf_counter()
        peft_model.generate(**enc, adapter_names=names, **gen_args)
        return len(texts) * sizes.new_tokens / (time.perf_counter() - start)

    def peft_serial() -> float:
        start = time.perf_counter()
        for text, name in list(zip(texts, names))[: sizes.peft_serial]:
            peft_model.set_adapter(name)
            peft_model.generate(**tok([text], return_tensors="pt").to(device), **gen_args)
        return sizes.peft_serial * sizes.new_tokens / (time.perf_counter() - start)

    runs = {
        "engine_base": lambda: run_engine(generator, texts, [0] * len(texts), sizes.new_tokens),
        "engine_adapters": lambda: run_engine(generator, texts, list(range(1, len(texts) + 1)), sizes.new_tokens),
        "matmul_floor": lambda: matmul_floor(generator.model, len(texts), sizes.new_tokens),
        "peft_mixed": peft_mixed,
        "peft_serial": peft_serial,
    }
    out = {key: 0.0 for key in runs}
    with torch.inference_mode():
        run_engine(generator, texts[:4], [0] * 4, 4)  # warm up allocators and kernels
        for r in range(rounds):
            for key, run in runs.items():
                out[key] = max(out[key], run())
                print(f"  round {r + 1} ({key}) {out[key]:8.1f} tokens/s (best so far)", flush=True)
    del generator, peft_model, base
    gc.collect()
    return out


def machine() -> dict:
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": models[0] if models else "unknown", "cores": os.cpu_count(), "gpu": gpu}


def report(numbers: dict, failures: Failures, sizes: Sizes) -> list[dict]:
    """Print the table; returns each ratio with its target."""
    n = numbers
    rows = [  # label, value, baseline key, target (ratio >= target), target label
        (f"(a) base, {sizes.concurrent} concurrent", n["a"], "engine_base", 0.90, "(a)/in-process engine >= 0.90"),
        (f"(b) {sizes.concurrent} r=8 q,v adapters", n["b"], "a", 0.90, "(b)/(a) >= 0.90"),
        ("(b) vs peft mixed batch", n["b"], "peft_mixed", 3.0, "(b)/peft mixed >= 3"),
        ("(b) vs peft one at a time", n["b"], "peft_serial", 15.0, "(b)/peft serial >= 15"),
        (f"(c) {sizes.concurrent} published-mix adapters", n["c"], "a", 0.80, "(c)/(a) >= 0.80"),
        (f"(d) base, {sizes.wide} concurrent", n["d_base"], None, None, ""),
        (f"(d) {sizes.wide} r=8 adapters", n["d"], "d_base", 0.85, "(d)/(d base) >= 0.85"),
        ("(e) Zipf stream, base", n["e_base"], None, None, ""),
        (f"(e) Zipf, {sizes.churn_adapters} adapters ({n['e_distinct_adapters']} used)", n["e"], "e_base", 0.75,
         "(e)/(e base) >= 0.75"),
        ("(g) single stream, base", n["g"]["base"]["tokens_per_s"], None, None, ""),
        ("(g) single stream, r=8 adapter", n["g"]["r8 adapter"]["tokens_per_s"], "g_base", None, ""),
        ("(h) in-process engine, base", n["engine_base"], None, None, ""),
        ("(h) in-process engine, adapters", n["engine_adapters"], "engine_base", None, ""),
        (f"(h) base matmuls alone, batch {sizes.concurrent}", n["matmul_floor"], None, None, ""),
        ("(h) peft mixed batch", n["peft_mixed"], None, None, ""),
        ("(h) peft one at a time", n["peft_serial"], None, None, ""),
    ]
    baselines = {**n, "g_base": n["g"]["base"]["tokens_per_s"]}
    print(f"\n{'scenario':40s} {'tokens/s':>9s} {'ratio':>7s}  target")
    ratios = []
    for label, value, baseline, target, target_label in rows:
        ratio = value / baselines[baseline] if baseline and baselines[baseline] else None
        verdict = "" if target is None else ("ok" if ratio >= target else "MISSED")
        print(f"{label:40s} {value:9.1f} {'' if ratio is None else f'{ratio:7.2f}':>7s}  {target_label} {verdict}")
        if target is not None:
            ratios.append({"label": target_label, "ratio": ratio, "target": target, "met": ratio >= target})
    f = n["f"]
    met = f["added_ms_p50"] <= 50
    print(f"(f) cold r=8 adapter, {sizes.cold_new_tokens} new tokens: cold p50 {f['cold_ms_p50']:.0f} ms, warm p50 "
          f"{f['warm_ms_p50']:.0f} ms, added p50 {f['added_ms_p50']:.0f} ms / p95 {f['added_ms_p95']:.0f} ms  "
          f"target added p50 <= 50 ms {'ok' if met else 'MISSED'}")
    ratios.append({"label": "cold added p50 <= 50 ms", "ratio": f["added_ms_p50"], "target": 50, "met": met})
    print("(g) time to first token p50: " + ", ".join(f"{k} {v['ttft_ms_p50']:.0f} ms" for k, v in n["g"].items()))
    print("non-200 answers: " + ", ".join(f"{k} {v}" for k, v in failures.counts.items()))
    for sample in failures.samples:
        print("  " + sample)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shrink every scenario (a smoke test)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of (a)-(d) and (h) (default 3; 1 with --quick)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the launcher and ceilings on GPU 0")
    parser.add_argument("--launcher-arg", action="append", default=[], help="an extra launcher flag (repeatable)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (adapters, launcher logs)")
    parser.add_argument("--model", type=Path, help="a model folder to serve instead of the SmolLM2 demo (e.g. one from "
                                                   "benchmarks/random_weights.py)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    rounds = args.rounds or (1 if args.quick else 3)
    info = {**machine(), "dtype": args.dtype, "device": args.device, "launcher_args": args.launcher_arg,
            "rounds": rounds, "sizes": asdict(sizes)}
    print(f"machine: {info['cpu']}, {info['cores']} cores; dtype {args.dtype}; rounds {rounds}", flush=True)

    model = args.model.resolve() if args.model else demo_gguf()
    folder = model if args.model else fetch_model(str(model))  # the launcher's download step finds this conversion
    config = json.loads((folder / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    failures = Failures()
    try:
        t0 = time.perf_counter()
        n_qv = max(sizes.churn_adapters, sizes.wide + sizes.cold)
        qv, _ = write_adapters(work / "adapters" / "qv8", [QV8] * n_qv, config, seed=1)
        mix_specs: list[Spec] = [PUBLISHED_MIX[i % len(PUBLISHED_MIX)] for i in range(sizes.concurrent)]
        mix, mix_bytes = write_adapters(work / "adapters" / "mix", mix_specs, config, seed=2)
        print(f"wrote {n_qv + len(mix)} adapters in {time.perf_counter() - t0:.0f} s; published mix "
              f"({len(mix)} adapters, {mix_bytes / 2**20:.0f} MiB of LoRA weights in all):", flush=True)
        for spec in PUBLISHED_MIX:
            print(f"  {mix_specs.count(spec)} x {spec.label()}")
        info.update(mix=[spec.label() for spec in mix_specs], mix_bytes=mix_bytes)

        print("(h) in-process ceilings (no launcher running)", flush=True)
        numbers = ceilings(folder, args.dtype, torch.device(args.device), prompts(sizes.concurrent), qv[: sizes.concurrent], sizes, rounds)

        concurrency = str(max(256, 2 * sizes.wide))
        print("(a)-(d), (f), (g): one launcher", flush=True)
        launcher = launch(str(model), work, args.dtype, args.device, *args.launcher_arg, "--max-concurrent-requests", concurrency)
        try:
            numbers.update(asyncio.run(shared_scenarios(launcher.url, sizes, rounds, qv, mix, failures)))
        finally:
            launcher.stop()

        print(f"(e) churn: launcher with --max-active-adapters {sizes.churn_active}", flush=True)
        launcher = launch(str(model), work, args.dtype, args.device, *args.launcher_arg, "--max-concurrent-requests", concurrency,
                          "--max-active-adapters", str(sizes.churn_active))
        try:
            numbers.update(asyncio.run(churn(launcher.url, sizes, qv[: sizes.churn_adapters], failures)))
        finally:
            launcher.stop()
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    ratios = report(numbers, failures, sizes)
    if args.json:
        args.json.write_text(json.dumps({**info, "tokens_per_s": numbers, "targets": ratios,
                                         "non_200": failures.counts, "failure_samples": failures.samples}, indent=1))
    if any(failures.counts.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
