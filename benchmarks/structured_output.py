"""Per-token decode cost of JSON-schema constrained requests vs unconstrained ones, side by side in one run, on
SmolLM2-135M (the demo model, 49k-token vocabulary).

(a) a batch of N unconstrained requests
(b) the same N requests, each constrained by a JSON schema (its own matcher, masks filled in parallel)

Both run the same number of decode steps (ignore_eos, so finished JSON rows keep stepping with an EOS-only mask and
every batch keeps its size); rounds interleave (a) and (b) and each keeps its best. Also prints the one-off cost of
compiling a schema (cold) and of reusing it (cached), for the example schema and the default `json_object` schema,
and the grammar work alone (mask + advance, replayed on the tokens of (b)), which the step time of (b) includes.
Usage: python benchmarks/structured_output.py [--requests 16] [--steps 48] [--rounds 3] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorax_server.demo_model import demo_gguf  # noqa: E402
from lorax_server.dist import Parallel  # noqa: E402
from lorax_server.pb import generate_pb2 as pb  # noqa: E402
from lorax_server.shard import build_service  # noqa: E402
from lorax_server.sources import fetch_model  # noqa: E402
from router.validation import ARBITRARY_JSON_SCHEMA  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "hobbies"],
}
PEOPLE = ["a retired teacher", "a young painter", "a ship captain", "a chess champion", "a baker", "a pilot"]


def requests(tokenizer, n: int, steps: int, constrained: bool) -> list[pb.Request]:
    out = []
    for i in range(n):
        text = f"Describe {PEOPLE[i % len(PEOPLE)]} as JSON with name, age, city and hobbies.\n"
        ids = tokenizer(text)["input_ids"]
        params = pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0,
                                               do_sample=True, seed=i)
        if constrained:
            params.schema = json.dumps(SCHEMA)
        out.append(pb.Request(
            id=i, inputs=text, tokenized_inputs=pb.TokenizedInputs(ids=ids), truncate=len(ids), parameters=params,
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=steps + 2, ignore_eos_token=True)))
    return out


def seconds_per_step(generator, batch_requests: list[pb.Request], steps: int) -> tuple[float, list[list[int]]]:
    """Mean wall time of one decode step of the batch (prefill excluded), and each request's tokens."""
    texts = {r.id: [] for r in batch_requests}
    gens, batch = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=batch_requests)))
    start = time.perf_counter()
    for _ in range(steps):
        for g in gens:
            texts[g.request_id].append(g.next_tokens.ids[0])
        gens, batch = generator.decode([batch])
    elapsed = time.perf_counter() - start
    batch.release(generator.cache)
    return elapsed / steps, list(texts.values())


def grammar_seconds_per_token(generator, tokens: list[list[int]]) -> float:
    """Mask + advance time per constrained token, replaying `tokens` through fresh constraints."""
    grammars = generator.grammars
    constraints = [grammars.constraint(json.dumps(SCHEMA)) for _ in tokens]
    grammars.allowed(constraints, generator.vocab, generator.device)  # copies made outside the timing
    start = time.perf_counter()
    for step in range(len(tokens[0])):
        grammars.allowed(constraints, generator.vocab, generator.device)
        grammars.advance(constraints, [t[step] for t in tokens])
    return (time.perf_counter() - start) / (len(tokens) * len(tokens[0]))


def compile_times(generator, schema: dict) -> tuple[float, float]:
    """Seconds until a new request's first mask is ready: with the schema not yet compiled, then cached (best of 5)."""
    times = []
    for _ in range(6):
        start = time.perf_counter()
        constraint = generator.grammars.constraint(json.dumps(schema))
        generator.grammars.allowed([constraint], generator.vocab, generator.device)
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    folder = fetch_model(str(demo_gguf()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = build_service(str(folder), None, "hub", args.dtype, Parallel(), device, "/unused").generator
    generator.allocate_cache(args.requests * 256)
    tok = generator.tokenizer

    for name, schema in (("example schema", SCHEMA), ("default json_object schema", ARBITRARY_JSON_SCHEMA)):
        cold, cached = compile_times(generator, schema)
        print(f"{name:28s} first mask after {cold * 1e3:7.2f} ms cold, {cached * 1e3:6.2f} ms cached")

    runs = {
        "a": lambda: seconds_per_step(generator, requests(tok, args.requests, args.steps, False), args.steps),
        "b": lambda: seconds_per_step(generator, requests(tok, args.requests, args.steps, True), args.steps),
    }
    seconds_per_step(generator, requests(tok, 2, 2, True), 2)  # warm up allocators and kernels
    best = {key: float("inf") for key in runs}
    constrained_tokens: list[list[int]] = []
    with torch.inference_mode():
        for _ in range(args.rounds):
            for key, run in runs.items():
                seconds, tokens = run()
                best[key] = min(best[key], seconds)
                constrained_tokens = tokens if key == "b" else constrained_tokens
        grammar = min(grammar_seconds_per_token(generator, constrained_tokens) for _ in range(args.rounds))

    n = args.requests
    print(f"device {device}, {n} requests, {args.steps} decode steps, vocabulary {generator.vocab}")
    print(f"(a) unconstrained  {best['a'] * 1e3:8.2f} ms/step  {best['a'] / n * 1e6:8.1f} us/token")
    print(f"(b) JSON schema    {best['b'] * 1e3:8.2f} ms/step  {best['b'] / n * 1e6:8.1f} us/token")
    print(f"overhead {(best['b'] - best['a']) / n * 1e6:.1f} us/token; (b)/(a) = {best['b'] / best['a']:.3f}")
    print(f"grammar work alone {grammar * 1e6:.1f} us/token ({grammar * n / best['b']:.2%} of a (b) step)")
    print(f"sample constrained output: {tok.decode(constrained_tokens[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
