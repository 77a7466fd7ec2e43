"""The model's chat template (spec 3.6): found beside its tokenizer, rendered in a Jinja sandbox.

The template is read from the same place the router's tokenizer came from: the local folder, or the hub cache that
loading the tokenizer has just filled (cache only: rendering a template never reaches the network). A
`chat_template.jinja` file wins over `tokenizer_config.json`'s `chat_template`, as in transformers, so prompts match
`tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.errors import InferError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


class TemplateError(InferError):
    status_code = 422
    error_type = "template_error"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Failed applying chat template to inputs: {reason}")


def _raise_exception(message: str) -> None:
    raise JinjaError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own `tojson` HTML-escapes; templates written for transformers expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    """The same Jinja settings as transformers' `apply_chat_template`, so both render identical prompts."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @property
    def uses_tools(self) -> bool:
        return "tools" in self.source

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt for `messages`, ending with the assistant's turn; a template error is a 422."""
        try:
            template = _environment().from_string(self.source)
            return template.render(
                messages=messages,
                tools=tools,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=True,
            )
        except Exception as error:  # the template is the model's code: any failure in it is the request's 422
            raise TemplateError(str(error)) from error


def _token(value: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _pick(template: Any) -> str | None:
    """`chat_template` is a string, or a list of `{name, template}` of which "default" is used."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def _read(name: str, revision: str | None, filename: str) -> str | None:
    """A file beside the tokenizer: from the local folder, else from the hub cache (never downloaded here)."""
    folder = Path(name)
    if folder.is_dir():
        path = folder / filename
        return path.read_text(encoding="utf-8") if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, filename, revision=revision)
    except ValueError:  # not a valid repo id: there is no cache entry to read
        return None
    return Path(cached).read_text(encoding="utf-8") if isinstance(cached, str) else None


def load_chat_template(name: str, revision: str | None = None) -> ChatTemplate | None:
    """The chat template of the tokenizer `name` (local folder or hub id), or None when it has none."""
    raw_config = _read(name, revision, CONFIG_FILE)
    config = json.loads(raw_config) if raw_config else {}
    source = _read(name, revision, TEMPLATE_FILE) or _pick(config.get("chat_template"))
    if not source:
        return None
    return ChatTemplate(source, bos_token=_token(config.get("bos_token")), eos_token=_token(config.get("eos_token")))
