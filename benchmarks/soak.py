"""Soak benchmark: the real `lorax-launcher` under a steady mix of traffic for N minutes, watching errors and memory.

Starts `lorax-launcher` on SmolLM2-135M (the demo model) as a user does, on 127.0.0.1 only, with
`--max-active-adapters` below the number of adapters on disk so the scheduler offloads and reloads adapters, and more
adapters than the shard's host-memory LRU (64) so that tier evicts too. Two Poisson arrival streams run for the
whole time:

- good requests: Zipf(1.1) popularity over random PEFT adapters of the published mix of ranks and targets
  (`benchmarks/adapters.py`), a share on the base model; prompts of about 10-300 tokens (log-uniform), 8-64 new
  tokens, greedy or sampled, plain `/generate` or `/generate_stream`; some clients go away early (a stream closed
  after a few tokens, a plain request abandoned before its answer);
- bad requests, kinds in turn: invalid parameters (422), an adapter that does not exist (4xx), malformed JSON (400)
  and inputs longer than `--max-input-length` (422).

Every answer is classed as ok, dropped (by the client, on purpose), expected (a bad request refused with its 4xx),
overloaded (429: admission control, counted apart) or unexpected (any other status, a 5xx, a stream that ends
without its final event, a request unanswered after `timeout_s`). The resident memory (VmRSS) of the launcher's
children (router, shards) is read from /proc every few seconds. Per window (a minute; 15 s with --quick) it prints
requests by class, p50/p99 latency of completed good requests, stream time to first token, generated tokens/s and
RSS; then errors by kind and a memory verdict: plateaued when each process grew less than `plateau_mib` between the
tenth of the run after half-way and its last tenth (medians of the samples in each), judged on runs of 10 minutes
or more. Exits 1 on any unexpected answer, if the launcher dies, or on a judged verdict that memory still grows.

The shard's RSS includes the KV cache's pages as they are first touched (the cache is reserved at start-up), so
it rises early while batches reach new lengths. The default rate is meant for an idle 2-core VM; on a machine
shared with other work lower `--rate`: past capacity, latency climbs window after window, then come 429s and
timeouts (which fail the run).

Usage: python benchmarks/soak.py [--minutes 30] [--quick] [--rate 1.5] [--json out.json] [--keep]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.adapters import PUBLISHED_MIX, write_adapters  # noqa: E402
from benchmarks.serving import TEXT, body, launch, machine, percentile, zipf_stream  # noqa: E402
from lorax_server.demo_model import demo_gguf  # noqa: E402
from lorax_server.sources import fetch_model  # noqa: E402
from tests.e2e import Launcher  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """What the run sends and how it is measured."""

    minutes: float = 30
    rate: float = 1.5          # good requests per second (Poisson): busy, not overloaded, on an idle 2-core VM
    bad_rate: float = 0.2      # bad requests per second
    adapters: int = 96         # above the host LRU's 64, so adapters are re-read from disk
    max_active: int = 8        # --max-active-adapters: adapters are offloaded and reloaded
    base_share: float = 0.25
    stream_share: float = 0.5
    sample_share: float = 0.3  # sampled (temperature/top_p/seed) rather than greedy
    drop_share: float = 0.1    # clients that go away before the end
    window_s: float = 60
    sample_s: float = 5        # memory sampling period
    timeout_s: float = 120     # a request unanswered this long is an unexpected failure
    plateau_mib: float = 64    # allowed growth per process over the last half of the run
    judge_minutes: float = 10  # shorter runs print the memory numbers without a verdict


QUICK = Plan(minutes=1, adapters=16, max_active=4, window_s=15, sample_s=2)
BAD_KINDS = ("invalid_params", "unknown_adapter", "malformed_json", "oversize_input")
EXPECTED = {"invalid_params": {422}, "unknown_adapter": {400, 404, 422, 424}, "malformed_json": {400},
            "oversize_input": {422}}
INVALID_PARAMS = ({"temperature": -1.0}, {"top_p": 1.5}, {"max_new_tokens": 100_000}, {"repetition_penalty": 0.0})
SSE_STATUS = {"overloaded": 429, "validation": 422, "generation": 424}  # an error event's type -> HTTP status
DROPPED = 499  # the client closed the request on purpose


@dataclass
class Outcome:
    """What the client saw of one request; times are seconds since the run started."""

    kind: str    # "base/plain", "adapter/stream", "bad/malformed_json", ...
    status: int  # HTTP status (an SSE error event: its error_type's status); 0 for no answer; 499 dropped
    start: float
    end: float = 0.0
    tokens: int = 0
    ttft: float | None = None
    detail: str = ""


@dataclass
class Run:
    """Everything a run records, filled in while it goes."""

    outcomes: list[Outcome] = field(default_factory=list)
    memory: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (t, {process: RSS bytes})


# ---------------------------------------------------------------- requests


def prompt(rng: random.Random) -> str:
    """About 10-300 tokens, log-uniform: mostly short prompts, some long ones."""
    words = round(math.exp(rng.uniform(math.log(10), math.log(300))))
    return " ".join(rng.choices(TEXT, k=words))


def good_payload(rng: random.Random, adapter: str | None, plan: Plan) -> dict:
    payload = body(prompt(rng), adapter, rng.randint(8, 64))
    if rng.random() < plan.sample_share:
        payload["parameters"].update(do_sample=True, temperature=0.8, top_p=0.9, seed=rng.randrange(2**31))
    return payload


def finish(outcome: Outcome, t0: float, status: int, detail: str = "") -> Outcome:
    outcome.status, outcome.end, outcome.detail = status, time.perf_counter() - t0, detail[:300]
    return outcome


async def plain(client: httpx.AsyncClient, outcome: Outcome, t0: float, payload: dict,
                drop_after_s: float | None) -> Outcome:
    """/generate; with `drop_after_s`, the client gives up after that long (if not answered by then)."""
    try:
        response = await asyncio.wait_for(client.post("/generate", json=payload), drop_after_s)
    except TimeoutError:
        return finish(outcome, t0, DROPPED, f"abandoned after {drop_after_s:.1f} s")
    except httpx.HTTPError as exc:
        return finish(outcome, t0, 0, repr(exc))
    if response.status_code != 200:
        return finish(outcome, t0, response.status_code, response.text)
    outcome.tokens = response.json()["details"]["generated_tokens"]
    return finish(outcome, t0, 200)


async def streamed(client: httpx.AsyncClient, outcome: Outcome, t0: float, payload: dict,
                   drop_after_tokens: int | None) -> Outcome:
    """/generate_stream; with `drop_after_tokens`, the client closes the stream after that many tokens."""
    try:
        async with client.stream("POST", "/generate_stream", json=payload) as response:
            if response.status_code != 200:
                return finish(outcome, t0, response.status_code, (await response.aread()).decode(errors="replace"))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return finish(outcome, t0, SSE_STATUS.get(event.get("error_type"), 500), f"event {event}")
                if event.get("token"):
                    outcome.tokens += 1
                    outcome.ttft = outcome.ttft or time.perf_counter() - t0 - outcome.start
                if event.get("generated_text") is not None:
                    return finish(outcome, t0, 200)
                if drop_after_tokens is not None and outcome.tokens >= drop_after_tokens:
                    return finish(outcome, t0, DROPPED, f"closed after {outcome.tokens} tokens")
    except httpx.HTTPError as exc:
        return finish(outcome, t0, 0, repr(exc))
    return finish(outcome, t0, 0, f"stream ended without its final event after {outcome.tokens} tokens")


async def good_request(client: httpx.AsyncClient, rng: random.Random, outcome: Outcome, adapter: str | None,
                       plan: Plan, t0: float) -> Outcome:
    """One request of the good mix (plain or streamed as `outcome.kind` says), some dropped by the client."""
    payload = good_payload(rng, adapter, plan)
    drop = rng.random() < plan.drop_share
    if outcome.kind.endswith("stream"):
        new_tokens = payload["parameters"]["max_new_tokens"]
        return await streamed(client, outcome, t0, payload, rng.randint(1, new_tokens - 1) if drop else None)
    return await plain(client, outcome, t0, payload, rng.uniform(0.2, 2.0) if drop else None)


def bad_request_args(kind: str, index: int, work: Path) -> dict:
    """The httpx arguments of one bad request of `kind` (the `index`-th of its kind picks its variant)."""
    if kind == "invalid_params":
        return {"json": {"inputs": "Hello", "parameters": {"max_new_tokens": 8, **INVALID_PARAMS[index % 4]}}}
    if kind == "unknown_adapter":
        missing = str(work / "adapters" / "missing" / uuid.uuid4().hex)
        return {"json": body("Hello", missing, 8)}
    if kind == "malformed_json":
        return {"content": b'{"inputs": "Hello", "parameters": {"max_new_tokens": ', "headers":
                {"content-type": "application/json"}}
    return {"json": body(" ".join(TEXT * 80), None, 8)}  # about 3900 tokens, over the default 1792 (and 2048)


async def bad_request(client: httpx.AsyncClient, outcome: Outcome, index: int, work: Path, t0: float) -> Outcome:
    try:
        response = await client.post("/generate", **bad_request_args(outcome.kind[4:], index, work))
    except httpx.HTTPError as exc:
        return finish(outcome, t0, 0, repr(exc))
    return finish(outcome, t0, response.status_code, response.text)


async def bounded(outcome: Outcome, request: Awaitable[Outcome], t0: float, timeout_s: float) -> Outcome:
    """`request`'s outcome, or `outcome` as unanswered when the request takes longer than `timeout_s` in all
    (httpx's own timeout bounds each read, not a stream that trickles)."""
    try:
        return await asyncio.wait_for(request, timeout_s)
    except TimeoutError:
        return finish(outcome, t0, 0, f"no answer in {timeout_s:.0f} s")


async def arrivals(rate: float, deadline: float, rng: random.Random, send: Callable[[int], Awaitable[Outcome]],
                   run: Run) -> None:
    """Call `send(i)` at Poisson arrival times (`rate` per second) until `deadline`, then wait for every answer."""
    tasks = []
    for i in itertools.count():
        await asyncio.sleep(rng.expovariate(rate))
        if time.perf_counter() >= deadline:
            break
        task = asyncio.create_task(send(i))
        task.add_done_callback(lambda done: done.cancelled() or run.outcomes.append(done.result()))
        tasks.append(task)
    await asyncio.gather(*tasks)


# ---------------------------------------------------------------- memory


def children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc/<pid>/task/*/children."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(found)


def role(pid: int) -> str:
    """'router', 'shard' or 'other', from the command line (every shard has the same one)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "other"
    if any(arg.endswith("lorax-router") for arg in args):
        return "router"
    return "shard" if any(arg.endswith("lorax-server") for arg in args) and "serve" in args else "other"


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_sample(launcher_pid: int) -> dict[str, int]:
    """RSS of the launcher, its router and its shards (named shard-0.. in pid order, i.e. start order)."""
    sample = {"launcher": rss_bytes(launcher_pid)}
    shards = 0
    for pid in children(launcher_pid):
        kind = role(pid)
        if kind == "shard":
            kind, shards = f"shard-{shards}", shards + 1
        if kind != "other":
            sample[kind] = rss_bytes(pid)
    return sample


async def watch(launcher: Launcher, plan: Plan, t0: float, stop: asyncio.Event, run: Run) -> None:
    """Sample memory every `plan.sample_s`, and once more at `stop`; a launcher that exits ends the run."""
    while True:
        if launcher.proc.poll() is not None:
            raise RuntimeError(f"launcher exited with {launcher.proc.returncode} during the run:\n{launcher.output()}")
        run.memory.append((time.perf_counter() - t0, memory_sample(launcher.proc.pid)))
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), plan.sample_s)
        except TimeoutError:
            pass


# ---------------------------------------------------------------- the run


async def soak(launcher: Launcher, plan: Plan, adapters: list[str], work: Path, seed: int) -> Run:
    """Both arrival streams for `plan.minutes`, memory sampled throughout; returns once every request answered."""
    run, stop, rng = Run(), asyncio.Event(), random.Random(seed)
    popular = itertools.cycle(zipf_stream(len(adapters), int(plan.rate * plan.minutes * 60) + 1000, seed=seed))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=launcher.url, timeout=plan.timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + plan.minutes * 60

        def good(_: int) -> Awaitable[Outcome]:
            adapter = None if rng.random() < plan.base_share else adapters[next(popular)]
            route = "stream" if rng.random() < plan.stream_share else "plain"
            outcome = Outcome(f"{'adapter' if adapter else 'base'}/{route}", 0, time.perf_counter() - t0)
            return bounded(outcome, good_request(client, rng, outcome, adapter, plan, t0), t0, plan.timeout_s)

        def bad(i: int) -> Awaitable[Outcome]:
            outcome = Outcome(f"bad/{BAD_KINDS[i % len(BAD_KINDS)]}", 0, time.perf_counter() - t0)
            return bounded(outcome, bad_request(client, outcome, i // len(BAD_KINDS), work, t0), t0, plan.timeout_s)

        watcher = asyncio.create_task(watch(launcher, plan, t0, stop, run))
        traffic = asyncio.gather(arrivals(plan.rate, deadline, random.Random(seed + 1), good, run),
                                 arrivals(plan.bad_rate, deadline, random.Random(seed + 2), bad, run))
        done, _ = await asyncio.wait([watcher, traffic], return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            traffic.cancel()
            watcher.result()  # raises: the launcher died
        stop.set()
        await watcher
    return run


# ---------------------------------------------------------------- report


def classify(outcome: Outcome) -> str:
    """ok, dropped, expected (a bad request's 4xx), overloaded (429) or unexpected."""
    if outcome.status == 429:
        return "overloaded"
    if outcome.kind.startswith("bad/"):
        return "expected" if outcome.status in EXPECTED[outcome.kind[4:]] else "unexpected"
    return {200: "ok", DROPPED: "dropped"}.get(outcome.status, "unexpected")


def window_row(outcomes: list[Outcome], memory: list[tuple[float, dict[str, int]]], lo: float, hi: float) -> dict:
    """Answers by class, latency of completed good requests, tokens/s, and the last RSS sample up to `hi`."""
    done = [o.end - o.start for o in outcomes if classify(o) == "ok"]
    ttft = [o.ttft for o in outcomes if classify(o) == "ok" and o.ttft is not None]
    rss = ([m for t, m in memory if t <= hi] or [{}])[-1]
    return {"start_s": lo, "end_s": hi, "answers": len(outcomes), **Counter(classify(o) for o in outcomes),
            "p50_s": percentile(done, 0.5) if done else None, "p99_s": percentile(done, 0.99) if done else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "tokens_per_s": sum(o.tokens for o in outcomes) / (hi - lo),
            "rss_mib": {name: value / 2**20 for name, value in rss.items()}}


def window_rows(run: Run, plan: Plan) -> list[dict]:
    """One row per window of `plan.window_s` by answer time (the drain after the deadline joins the last one),
    then one for the whole run."""
    span = max([plan.minutes * 60] + [o.end for o in run.outcomes])
    count = max(1, int(plan.minutes * 60 // plan.window_s))
    buckets: list[list[Outcome]] = [[] for _ in range(count)]
    for o in run.outcomes:
        buckets[min(int(o.end // plan.window_s), count - 1)].append(o)
    edges = [w * plan.window_s for w in range(count)] + [span]
    rows = [window_row(b, run.memory, lo, hi) for b, lo, hi in zip(buckets, edges, edges[1:])]
    return rows + [window_row(run.outcomes, run.memory, 0.0, span)]


def print_windows(rows: list[dict]) -> None:
    names = sorted({name for row in rows for name in row["rss_mib"]} - {"launcher"})
    print(f"\n{'window':>11s} {'answers':>7s} {'ok':>5s} {'drop':>5s} {'4xx':>4s} {'429':>4s} {'unexp':>5s} "
          f"{'p50 s':>6s} {'p99 s':>6s} {'ttft':>5s} {'tok/s':>6s} " + " ".join(f"{n + ' MiB':>13s}" for n in names))

    def num(value: float | None, width: int, digits: int = 2) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"

    for i, r in enumerate(rows):
        window = "all" if i == len(rows) - 1 else f"{r['start_s'] / 60:.2f}-{r['end_s'] / 60:.2f}m"
        print(f"{window:>11s} {r['answers']:7d} {r.get('ok', 0):5d} {r.get('dropped', 0):5d} "
              f"{r.get('expected', 0):4d} {r.get('overloaded', 0):4d} {r.get('unexpected', 0):5d} "
              f"{num(r['p50_s'], 6)} {num(r['p99_s'], 6)} {num(r['ttft_p50_s'], 5)} {num(r['tokens_per_s'], 6, 1)} "
              + " ".join(num(r["rss_mib"].get(n), 13, 0) for n in names))


def error_counts(run: Run) -> dict:
    """Answers by class, then by kind and status; the first unexpected answers in full."""
    by_class: dict[str, Counter] = {}
    for o in run.outcomes:
        by_class.setdefault(classify(o), Counter())[f"{o.kind} {o.status}"] += 1
    unexpected = [asdict(o) for o in run.outcomes if classify(o) == "unexpected"][:10]
    return {"by_class": {k: dict(sorted(v.items())) for k, v in sorted(by_class.items())},
            "unexpected_samples": unexpected}


def memory_verdict(run: Run, plan: Plan) -> dict:
    """Per process: RSS at the start, half-way and the end, peak, and growth over the last half (see the docstring)."""
    samples = run.memory
    tenth = max(1, len(samples) // 10)
    half = len(samples) // 2
    out: dict = {"threshold_mib": plan.plateau_mib, "judged": plan.minutes >= plan.judge_minutes, "processes": {}}
    for name in sorted({n for _, m in samples for n in m}):
        values = [m.get(name, 0) / 2**20 for _, m in samples]
        growth = statistics.median(values[-tenth:]) - statistics.median(values[half: half + tenth])
        out["processes"][name] = {"start_mib": values[0], "half_mib": values[half], "end_mib": values[-1],
                                  "peak_mib": max(values), "growth_last_half_mib": growth,
                                  "plateaued": growth < plan.plateau_mib}
    out["plateaued"] = all(p["plateaued"] for p in out["processes"].values())
    return out


def print_summary(errors: dict, verdict: dict, run: Run, plan: Plan) -> None:
    print("\nanswers by class (kind status: count):")
    for name, counts in errors["by_class"].items():
        print(f"  {name:10s} " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    for sample in errors["unexpected_samples"]:
        print(f"  UNEXPECTED {sample['kind']} {sample['status']} at {sample['start']:.1f} s: {sample['detail']}")
    print(f"\nmemory (RSS MiB; {len(run.memory)} samples every {plan.sample_s:g} s): start -> half-way -> end (peak)")
    for name, p in verdict["processes"].items():
        print(f"  {name:9s} {p['start_mib']:7.0f} -> {p['half_mib']:7.0f} -> {p['end_mib']:7.0f} ({p['peak_mib']:.0f});"
              f" last half {p['growth_last_half_mib']:+.0f}")
    grew = [n for n, p in verdict["processes"].items() if not p["plateaued"]]
    rule = (f"growth over the last half (median of its first tenth to median of the run's last tenth) "
            f"< {plan.plateau_mib:g} MiB per process")
    if not verdict["judged"]:
        state = "plateaued" if not grew else f"still growing: {', '.join(grew)}"
        print(f"verdict: memory not judged (run shorter than {plan.judge_minutes:g} min; would be: {state}); {rule}")
    elif grew:
        print(f"verdict: memory did NOT plateau ({', '.join(grew)}); {rule}")
    else:
        print(f"verdict: memory plateaued; {rule}")


def server_log_errors(launcher: Launcher) -> list[str]:
    """The launcher's log lines (its children's included) that report an error or a traceback."""
    text = Path(launcher.log.name).read_text(errors="replace")
    return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]


# ---------------------------------------------------------------- main


def parse_plan() -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, help="how long to send traffic (default 30; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run on 16 adapters")
    parser.add_argument("--rate", type=float, help=f"good requests per second (default {Plan.rate})")
    parser.add_argument("--bad-rate", type=float, help=f"bad requests per second (default {Plan.bad_rate})")
    parser.add_argument("--adapters", type=int, help=f"adapters on disk (default {Plan.adapters})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launcher-arg", action="append", default=[], help="an extra launcher flag (repeatable)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (adapters, launcher log)")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    chosen = {"minutes": args.minutes, "rate": args.rate, "bad_rate": args.bad_rate, "adapters": args.adapters}
    return replace(plan, **{k: v for k, v in chosen.items() if v is not None}), args


def prepare_adapters(work: Path, config: dict, plan: Plan) -> tuple[list[str], dict]:
    """`plan.adapters` random adapters cycling through the published mix; the mix's description for the report."""
    t = time.perf_counter()
    specs = [PUBLISHED_MIX[i % len(PUBLISHED_MIX)] for i in range(plan.adapters)]
    paths, weights = write_adapters(work / "adapters" / "mix", specs, config, seed=3)
    print(f"wrote {len(paths)} adapters ({weights / 2**20:.0f} MiB of LoRA weights) in {time.perf_counter() - t:.0f} s:"
          + "".join(f"\n  {specs.count(s)} x {s.label()}" for s in PUBLISHED_MIX), flush=True)
    return paths, {"adapter_mix": dict(Counter(s.label() for s in specs)), "adapter_bytes": weights}


def main() -> None:
    plan, args = parse_plan()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` / kill: still stop the launcher below
    info = {**machine(), "plan": asdict(plan), "launcher_args": args.launcher_arg, "seed": args.seed}
    print(f"machine: {info['cpu']}, {info['cores']} cores; {plan.minutes:g} min at {plan.rate:g} good + "
          f"{plan.bad_rate:g} bad requests/s", flush=True)
    gguf = demo_gguf()
    config = json.loads((fetch_model(str(gguf)) / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        adapters, mix = prepare_adapters(work, config, plan)
        launcher = launch(str(gguf), work, "float32", "cpu", "--max-active-adapters", str(plan.max_active),
                          *args.launcher_arg)
        try:
            print(f"launcher ready at {launcher.url}; sending traffic", flush=True)
            run = asyncio.run(soak(launcher, plan, adapters, work, args.seed))
        finally:
            log_errors = server_log_errors(launcher)
            launcher.stop()
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows, errors, verdict = window_rows(run, plan), error_counts(run), memory_verdict(run, plan)
    print_windows(rows)
    print_summary(errors, verdict, run, plan)
    print(f"server log: {len(log_errors)} error lines" + "".join(f"\n  {line[:300]}" for line in log_errors[:5]))
    if args.json:
        args.json.write_text(json.dumps({**info, **mix, "windows": rows, "errors": errors, "memory": verdict,
                                         "memory_samples": run.memory, "server_log_errors": log_errors[:50]},
                                        indent=1))
    unexpected = sum(errors["by_class"].get("unexpected", {}).values())
    if unexpected or (verdict["judged"] and not verdict["plateaued"]):
        print(f"FAILED: {unexpected} unexpected answers" + ("" if verdict["plateaued"] else "; memory still grows"))
        sys.exit(1)


if __name__ == "__main__":
    main()
