"""A JSON schema (from `response_format`) as an llguidance grammar, checked for errors.

Torch-free, so the router can reject a bad schema with a 422 before any shard sees it, using exactly the
compilation the shards use.

Options: at most one space where JSON allows whitespace (as the reference's Outlines regex does), so a weak model
cannot wander off into endless newlines; unsupported keywords (e.g. an unknown `format`) are ignored rather than
refused, as the reference ignores them.
"""
from __future__ import annotations

from llguidance import LLMatcher

JSON_OPTIONS = {"whitespace_pattern": r"[ ]?", "lenient": True}


def json_schema_grammar(schema: str) -> str:
    """The grammar for `schema` (JSON text). Raises ValueError saying what is wrong with an invalid schema."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as error:
        raise ValueError(f"invalid JSON schema: {error}") from error
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"invalid JSON schema: {problem}")
    return grammar
