"""The launcher's log lines and its children's, all on the launcher's stdout, one whole line at a time."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import datetime, timezone

log = logging.getLogger("lorax_launcher")
_stdout_lock = threading.Lock()
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 1}


def write_line(line: str) -> None:
    """Write one line to stdout; threads forwarding different children never interleave within a line."""
    with _stdout_lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # stdout closed (e.g. a pipe reader went away): logging must not take the launcher down


def _timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _json_line(level: str, target: str, message: str) -> str:
    return json.dumps({"timestamp": _timestamp(), "level": level, "target": target, "message": message})


class _LineHandler(logging.Handler):
    def __init__(self, json_output: bool) -> None:
        super().__init__()
        self.json_output = json_output

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.json_output:
            write_line(_json_line(record.levelname, record.name, message))
        else:
            write_line(f"{_timestamp()} {record.levelname:>7} {record.name}: {message}")


def log_level(spec: str | None) -> int:
    """The level named by LOG_LEVEL (`info`, `debug`, ... or tracing's `target=level,level`); INFO otherwise."""
    for directive in reversed((spec or "").split(",")):
        name = directive.rsplit("=", 1)[-1].strip().lower()
        if name in _LEVELS:
            return _LEVELS[name]
    return logging.INFO


def setup_logging(json_output: bool) -> None:
    """Text or JSON lines on stdout, filtered by LOG_LEVEL."""
    log.handlers = [_LineHandler(json_output)]
    log.setLevel(log_level(os.environ.get("LOG_LEVEL")))
    log.propagate = False


def child_line(name: str, line: str, json_output: bool) -> str:
    """How a child's output line appears on the launcher's stdout.

    Text mode prefixes the child's name; JSON mode keeps JSON lines as they are and wraps the others, so the
    launcher's stdout stays one JSON object per line for log collectors.
    """
    if not json_output:
        return f"[{name}] {line}"
    try:
        if isinstance(json.loads(line), dict):
            return line
    except ValueError:
        pass
    return _json_line("INFO", name, line)
