"""The launcher's flags as a markdown table (`python -m lorax_launcher.flags_table`), for the README.

Read from the click command itself, so the documentation cannot drift from the code.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import click

from lorax_launcher.cli import main


class Flag(NamedTuple):
    name: str
    envvar: str
    default: str
    help: str


def flags(command: click.Command = main) -> Iterator[Flag]:
    """Every option of `command` in --help order: its flags, env var, documented default and help."""
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        value = param.get_default(click.Context(command), call=False)
        default = "" if value is None or param.is_flag or not isinstance(value, (str, int, float)) else str(value)
        yield Flag(", ".join(param.opts), param.envvar or "", default, " ".join((param.help or "").split()))


def markdown() -> str:
    """The flags as a markdown table."""
    rows = ["| Flag | Env var | Default | Description |", "|---|---|---|---|"]
    for flag in flags():
        cells = (f"`{flag.name}`", f"`{flag.envvar}`" if flag.envvar else "",
                 f"`{flag.default}`" if flag.default else "", flag.help.replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
