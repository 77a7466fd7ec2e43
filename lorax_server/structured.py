"""JSON-schema constrained decoding on the shard (spec 5.9's schema mask), with llguidance.

Why llguidance rather than a regex-DFA index (outlines-core): the reference's default `json_object` schema nests
"any object" inside objects, and its regex DFA did not compile in minutes even for a 320-token vocabulary, while
llguidance parses JSON lazily (a grammar, not a regex): any schema compiles in about a millisecond and a step's
mask costs tens of microseconds per request at a 49k vocabulary (see benchmarks/structured_output.py).

A schema is compiled once per shard (the tokenizer is fixed per shard, so the cache key is the schema text) into a
prototype matcher; each request gets a cheap copy of it holding its own parser state, which travels with the
request through filter and concatenate. Compilation runs on a helper thread started when the batch is built, so it
overlaps the prefill forward. Each step the masks of all constrained rows are filled in parallel (Rust threads, no
GIL) into one bitmask, which is unpacked on the device and applied to the logits with one masked_fill.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from lorax_server.grammar import json_schema_grammar


class Constraint:
    """One request's place in its grammar. Its matcher is copied from the compiled prototype on first use, so
    building a batch never waits for compilation."""

    def __init__(self, compiled: Future):
        self._compiled = compiled
        self._matcher: LLMatcher | None = None

    def failure(self) -> str | None:
        """Why the schema did not compile (waiting for the compilation), or None when it did."""
        error = self._compiled.exception()
        return None if error is None else str(error)

    @property
    def matcher(self) -> LLMatcher:
        if self._matcher is None:
            self._matcher = self._compiled.result().deep_copy()
        return self._matcher


class Grammars:
    """Compiles schemas against one tokenizer (cached, in the background) and masks batches of constrained rows."""

    def __init__(self, tokenizer, vocab: int, eos_ids: list[int], cache_size: int = 256):
        backend = copy.copy(tokenizer.backend_tokenizer)  # the Rust tokenizer, with added tokens
        backend.no_padding()
        backend.no_truncation()
        self._tokenizer_json = backend.to_str()  # serialized here: the compiler thread must not share the tokenizer
        self._vocab = max(vocab, len(tokenizer))
        self._eos_ids = eos_ids
        self._cache_size = cache_size
        self._compiled: OrderedDict[str, Future] = OrderedDict()
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._tokenizer: LLTokenizer | None = None  # built on the compiler thread at the first schema
        self._executor: LLExecutor | None = None

    def constraint(self, schema: str) -> Constraint:
        """A new request's constraint; compiles `schema` unless it is cached (least recently used goes first)."""
        compiled = self._compiled.pop(schema, None)
        if compiled is None:
            compiled = self._compiler.submit(self._compile, schema)
        self._compiled[schema] = compiled
        while len(self._compiled) > self._cache_size:
            self._compiled.popitem(last=False)
        return Constraint(compiled)

    def compiled(self, schema: str) -> Future | None:
        """The cached compilation of `schema`, if any."""
        return self._compiled.get(schema)

    def _compile(self, schema: str) -> LLMatcher:
        if self._tokenizer is None:
            self._tokenizer = LLTokenizer(self._tokenizer_json, n_vocab=self._vocab, eos_token=self._eos_ids)
        matcher = LLMatcher(self._tokenizer, json_schema_grammar(schema), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid JSON schema: {matcher.get_error()}")
        return matcher

    def allowed(self, constraints: list[Constraint], vocab: int, device: torch.device) -> torch.Tensor:
        """[len(constraints), vocab] bool: the tokens each request may take next. A complete JSON value allows only
        EOS (so generation ends there), and so does a matcher that was ever fed a token outside its mask."""
        matchers = [(c.matcher, row) for row, c in enumerate(constraints)]  # waits for any compilation in flight
        words = (self._vocab + 31) // 32
        bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
        if self._executor is None:
            self._executor = LLExecutor()
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(matchers))
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        bits = (bitmask.to(device)[:, :, None] >> shifts) & 1
        return bits.view(len(matchers), -1)[:, :vocab].bool()

    @staticmethod
    def advance(constraints: list[Constraint], tokens: list[int]) -> None:
        """Feed each request's chosen token to its matcher."""
        for constraint, token in zip(constraints, tokens):
            constraint.matcher.consume_token(token)
