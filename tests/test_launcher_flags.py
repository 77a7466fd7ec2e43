"""Every documented launcher flag: present in --help in the documented order, with its env var and default;
settable through its env var; the flag beating the env var; and what it turns into for the children.

The table below is copied from the launcher's published help (the seed), so it stands on its own in CI.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner

from lorax_launcher import cli
from lorax_launcher.commands import (download_command, download_env, router_command, router_env, shard_command,
                                     shard_env)
from lorax_launcher.config import LauncherConfig


class Flag(NamedTuple):
    flag: str
    envvar: str | None
    documented_default: str | None  # as --help shows it; None: no default shown
    field: str  # the LauncherConfig field it sets
    by_flag: tuple[str | None, Any]  # (value on the command line, None for a presence flag; parsed value)
    by_env: tuple[str, Any]  # (env var value; parsed value)
    default: Any  # the parsed value when neither is given (no model config, no GPU env)
    context: dict[str, str] = {}  # extra env vars the row needs to be a valid configuration


SEED = [
    Flag("--model-id", "MODEL_ID", "mistralai/Mistral-7B-Instruct-v0.1", "model_id",
         ("org/flag-model", "org/flag-model"), ("org/env-model", "org/env-model"),
         "mistralai/Mistral-7B-Instruct-v0.1"),
    Flag("--adapter-id", "ADAPTER_ID", '""', "adapter_id", ("org/a1", "org/a1"), ("org/a2", "org/a2"), ""),
    Flag("--source", "SOURCE", "hub", "source", ("s3", "s3"), ("local", "local"), "hub"),
    Flag("--adapter-source", "ADAPTER_SOURCE", "hub", "adapter_source", ("pbase", "pbase"), ("s3", "s3"), "hub"),
    Flag("--revision", "REVISION", None, "revision", ("main", "main"), ("refs/pr/2", "refs/pr/2"), None),
    Flag("--validation-workers", "VALIDATION_WORKERS", "2", "validation_workers", ("3", 3), ("5", 5), 2),
    Flag("--sharded", "SHARDED", None, "num_shard", ("false", 1), ("true", 2), 2,
         {"CUDA_VISIBLE_DEVICES": "0,1"}),
    Flag("--num-shard", "NUM_SHARD", None, "num_shard", ("2", 2), ("3", 3), 1),
    Flag("--quantize", "QUANTIZE", None, "quantize", ("gptq", "gptq"), ("awq", "awq"), None),
    Flag("--compile", "COMPILE", None, "compile", (None, True), ("1", True), False),
    Flag("--dtype", "DTYPE", None, "dtype", ("float16", "float16"), ("bfloat16", "bfloat16"), None),
    Flag("--trust-remote-code", "TRUST_REMOTE_CODE", None, "trust_remote_code", (None, True), ("true", True), False),
    Flag("--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", "128", "max_concurrent_requests",
         ("64", 64), ("32", 32), 128),
    Flag("--max-best-of", "MAX_BEST_OF", "2", "max_best_of", ("3", 3), ("4", 4), 2),
    Flag("--max-stop-sequences", "MAX_STOP_SEQUENCES", "4", "max_stop_sequences", ("6", 6), ("8", 8), 4),
    Flag("--max-input-length", "MAX_INPUT_LENGTH", "1792", "max_input_length", ("1000", 1000), ("1500", 1500), 1792),
    Flag("--max-total-tokens", "MAX_TOTAL_TOKENS", "2048", "max_total_tokens", ("4000", 4000), ("3000", 3000), 2048),
    Flag("--waiting-served-ratio", "WAITING_SERVED_RATIO", "1.2", "waiting_served_ratio",
         ("0.3", 0.3), ("2.5", 2.5), 1.2),
    Flag("--max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", "4096", "max_batch_prefill_tokens",
         ("5000", 5000), ("6000", 6000), 4096),
    Flag("--max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", None, "max_batch_total_tokens",
         ("8192", 8192), ("16384", 16384), None),
    Flag("--max-waiting-tokens", "MAX_WAITING_TOKENS", "20", "max_waiting_tokens", ("10", 10), ("30", 30), 20),
    Flag("--max-active-adapters", "MAX_ACTIVE_ADAPTERS", "1024", "max_active_adapters", ("8", 8), ("16", 16), 1024),
    Flag("--adapter-cycle-time-s", "ADAPTER_CYCLE_TIME_S", "2", "adapter_cycle_time_s", ("5", 5), ("7", 7), 2),
    Flag("--hostname", "HOSTNAME", "0.0.0.0", "hostname", ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"),
         "0.0.0.0"),
    Flag("--port", "PORT", "3000", "port", ("8080", 8080), ("9090", 9090), 3000),
    Flag("--shard-uds-path", "SHARD_UDS_PATH", "/tmp/lorax-server", "shard_uds_path", ("/tmp/a", "/tmp/a"),
         ("/tmp/b", "/tmp/b"), "/tmp/lorax-server"),
    Flag("--master-addr", "MASTER_ADDR", "localhost", "master_addr", ("10.0.0.1", "10.0.0.1"),
         ("10.0.0.2", "10.0.0.2"), "localhost"),
    Flag("--master-port", "MASTER_PORT", "29500", "master_port", ("29501", 29501), ("29502", 29502), 29500),
    Flag("--huggingface-hub-cache", "HUGGINGFACE_HUB_CACHE", None, "huggingface_hub_cache", ("/c1", "/c1"),
         ("/c2", "/c2"), None),
    Flag("--weights-cache-override", "WEIGHTS_CACHE_OVERRIDE", None, "weights_cache_override", ("/w1", "/w1"),
         ("/w2", "/w2"), None),
    Flag("--disable-custom-kernels", "DISABLE_CUSTOM_KERNELS", None, "disable_custom_kernels", (None, True),
         ("1", True), False),
    Flag("--cuda-memory-fraction", "CUDA_MEMORY_FRACTION", "1.0", "cuda_memory_fraction", ("0.5", 0.5),
         ("0.8", 0.8), 1.0),
    Flag("--json-output", "JSON_OUTPUT", None, "json_output", (None, True), ("true", True), False),
    Flag("--otlp-endpoint", "OTLP_ENDPOINT", None, "otlp_endpoint", ("http://o1:4317", "http://o1:4317"),
         ("http://o2:4317", "http://o2:4317"), None),
    Flag("--cors-allow-origin", "CORS_ALLOW_ORIGIN", None, "cors_allow_origin", ("https://a", "https://a"),
         ("https://b", "https://b"), None),
    Flag("--watermark-gamma", "WATERMARK_GAMMA", None, "watermark_gamma", ("0.5", 0.5), ("0.25", 0.25), None),
    Flag("--watermark-delta", "WATERMARK_DELTA", None, "watermark_delta", ("2.0", 2.0), ("1.5", 1.5), None),
    Flag("--ngrok", "NGROK", None, "ngrok", (None, True), ("1", True), False,
         {"NGROK_AUTHTOKEN": "tok", "NGROK_EDGE": "edge"}),
    Flag("--ngrok-authtoken", "NGROK_AUTHTOKEN", None, "ngrok_authtoken", ("t1", "t1"), ("t2", "t2"), None),
    Flag("--ngrok-edge", "NGROK_EDGE", None, "ngrok_edge", ("e1", "e1"), ("e2", "e2"), None),
    Flag("--download-only", "DOWNLOAD_ONLY", None, "download_only", (None, True), ("true", True), False),
]
# --help order also places these (no env var): -e/--env before --download-only, then -h/--help, -V/--version.
HELP_ORDER = [row.flag for row in SEED[:-1]] + ["--env", "--download-only", "--help", "--version"]
SHORT = {"--port": "-p", "--env": "-e", "--help": "-h", "--version": "-V"}
ALL_ENV_VARS = [row.envvar for row in SEED] + ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LOG_LEVEL"]


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[LauncherConfig]:
    """The configs `main` would launch with; nothing is spawned."""
    configs: list[LauncherConfig] = []
    monkeypatch.setattr(cli, "launch", lambda cfg: configs.append(cfg) or 0)
    return configs


def invoke(args: list[str], env: dict[str, str] | None = None):
    """Run the CLI with a clean launcher environment (the test machine may export HOSTNAME, PORT, ...)."""
    clean: dict[str, str | None] = {var: None for var in ALL_ENV_VARS}
    clean.update(env or {})
    return CliRunner().invoke(cli.main, args, env=clean, terminal_width=200)


def parse(launched: list[LauncherConfig], args: list[str], env: dict[str, str] | None = None) -> LauncherConfig:
    result = invoke(args, env)
    assert result.exit_code == 0, result.output
    return launched.pop()


def cmdline(row: Flag, value: str | None) -> list[str]:
    return [row.flag] if value is None else [row.flag, value]


def test_help_lists_every_documented_flag_in_order_with_env_var_and_default() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    text = result.output
    positions = []
    for flag in HELP_ORDER:
        spelled = f"{SHORT[flag]}, {flag}" if flag in SHORT else flag
        match = re.search(rf"^\s+{re.escape(spelled)}(\s|$)", text, re.MULTILINE)
        assert match, f"{spelled} missing from --help"
        positions.append(match.start())
    assert positions == sorted(positions), "flags are not in the documented order"
    for row, start, end in zip(SEED[:-1], positions, positions[1:]):
        entry = re.sub(r"\s", "", text[start:end])
        assert f"envvar:{row.envvar}" in entry, row.flag
        if row.documented_default is not None:
            assert f"default:{row.documented_default}" in entry, row.flag
        else:
            assert "default:" not in entry, row.flag
    env_entry = text[positions[HELP_ORDER.index("--env")]:positions[HELP_ORDER.index("--download-only")]]
    assert "env var" not in env_entry


def test_every_option_is_documented_in_the_table() -> None:
    """No option exists that the seed does not list (nor one defined twice)."""
    names = [opt for param in cli.main.params for opt in param.opts if opt.startswith("--")]
    assert names == HELP_ORDER


@pytest.mark.parametrize("row", SEED, ids=lambda row: row.flag)
def test_default(row: Flag, launched: list[LauncherConfig]) -> None:
    cfg = parse(launched, [], row.context)
    assert getattr(cfg, row.field) == row.default


@pytest.mark.parametrize("row", SEED, ids=lambda row: row.flag)
def test_env_var_sets_the_flag(row: Flag, launched: list[LauncherConfig]) -> None:
    value, parsed = row.by_env
    cfg = parse(launched, [], {**row.context, row.envvar: value})
    assert getattr(cfg, row.field) == parsed


@pytest.mark.parametrize("row", SEED, ids=lambda row: row.flag)
def test_flag_beats_env_var(row: Flag, launched: list[LauncherConfig]) -> None:
    value, parsed = row.by_flag
    env_value = "false" if value is None else row.by_env[0]
    cfg = parse(launched, cmdline(row, value), {**row.context, row.envvar: env_value})
    assert getattr(cfg, row.field) == parsed


PRESENCE = [row for row in SEED if row.by_flag[0] is None]


@pytest.mark.parametrize("row", PRESENCE, ids=lambda row: row.flag)
@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("false", False), ("0", False)])
def test_presence_flags_accept_boolean_env_values(row: Flag, value: str, expected: bool,
                                                  launched: list[LauncherConfig]) -> None:
    cfg = parse(launched, [], {**row.context, row.envvar: value})
    assert getattr(cfg, row.field) is expected


def test_short_port(launched: list[LauncherConfig]) -> None:
    assert parse(launched, ["-p", "8000"]).port == 8000


def test_version() -> None:
    result = invoke(["-V"])
    assert result.exit_code == 0
    assert result.output.startswith("lorax-launcher, version ")


def test_env_report_redacts_secrets_and_goes_on(launched: list[LauncherConfig]) -> None:
    result = invoke(["-e", "--ngrok", "--ngrok-authtoken", "sekret-token", "--ngrok-edge", "edge"],
                    {"HF_API_TOKEN": "hf_sekret"})
    assert result.exit_code == 0, result.output
    assert "Python version:" in result.output and "CUDA:" in result.output and "torch version:" in result.output
    assert "sekret" not in result.output
    assert "ngrok_authtoken: '<redacted>'" in result.output
    assert launched, "the launch did not go on after --env"


def test_env_has_no_env_var(launched: list[LauncherConfig]) -> None:
    result = invoke([], {"ENV": "1"})
    assert "Python version:" not in result.output


# What each flag turns into for the children: (args, which command/env, the fragment it must contain).
def commands_of(cfg: LauncherConfig, environ: dict[str, str]) -> dict[str, Any]:
    return {
        "download": download_command(cfg),
        "shard": shard_command(cfg, "/models/folder"),
        "router": router_command(cfg, "/models/folder"),
        "download_env": download_env(cfg, environ),
        "shard_env": shard_env(cfg, 1, environ),
        "router_env": router_env(environ),
    }


PRODUCES = [
    (["--model-id", "org/m"], "download", ["download-weights", "org/m"]),
    (["--model-id", "org/m"], "router", ["--model-id", "org/m"]),
    (["--model-id", "org/m@v2"], "router", ["--model-id", "org/m", "--adapter-source", "hub", "--revision", "v2"]),
    (["--model-id", "org/m@v2"], "shard", ["--revision", "v2"]),
    (["--model-id", "org/m@v2"], "download", ["--revision", "v2"]),
    (["--adapter-id", "org/a"], "download", ["--adapter-id", "org/a"]),
    (["--adapter-id", "org/a"], "shard", ["--adapter-id", "org/a"]),
    (["--source", "s3"], "download", ["--source", "s3"]),
    (["--source", "s3"], "shard", ["--source", "s3"]),
    (["--adapter-source", "pbase"], "download", ["--adapter-source", "pbase"]),
    (["--adapter-source", "pbase"], "shard", ["--adapter-source", "pbase"]),
    (["--adapter-source", "pbase"], "router", ["--adapter-source", "pbase"]),
    (["--revision", "r1"], "download", ["--revision", "r1"]),
    (["--revision", "r1"], "shard", ["--revision", "r1"]),
    (["--revision", "r1"], "router", ["--revision", "r1"]),
    (["--validation-workers", "7"], "router", ["--validation-workers", "7"]),
    (["--num-shard", "2"], "shard", ["--sharded"]),
    (["--num-shard", "2"], "shard_env", {"RANK": "1", "WORLD_SIZE": "2"}),
    (["--quantize", "awq"], "shard", ["--quantize", "awq"]),
    (["--compile"], "shard", ["--compile"]),
    (["--dtype", "bfloat16"], "shard", ["--dtype", "bfloat16"]),
    (["--trust-remote-code"], "shard", ["--trust-remote-code"]),
    (["--max-concurrent-requests", "9"], "router", ["--max-concurrent-requests", "9"]),
    (["--max-best-of", "3"], "router", ["--max-best-of", "3"]),
    (["--max-stop-sequences", "6"], "router", ["--max-stop-sequences", "6"]),
    (["--max-input-length", "100"], "router", ["--max-input-length", "100"]),
    (["--max-total-tokens", "300"], "router", ["--max-total-tokens", "300"]),
    (["--waiting-served-ratio", "0.5"], "router", ["--waiting-served-ratio", "0.5"]),
    (["--max-batch-prefill-tokens", "5000"], "router", ["--max-batch-prefill-tokens", "5000"]),
    (["--max-batch-total-tokens", "9000"], "router", ["--max-batch-total-tokens", "9000"]),
    (["--max-waiting-tokens", "11"], "router", ["--max-waiting-tokens", "11"]),
    (["--max-active-adapters", "12"], "router", ["--max-active-adapters", "12"]),
    (["--adapter-cycle-time-s", "13"], "router", ["--adapter-cycle-time-s", "13"]),
    (["--hostname", "127.0.0.1"], "router", ["--hostname", "127.0.0.1"]),
    (["--hostname", "no-such-host.invalid"], "router", ["--hostname", "0.0.0.0"]),
    (["--port", "8081"], "router", ["--port", "8081"]),
    (["--shard-uds-path", "/tmp/x"], "shard", ["--uds-path", "/tmp/x"]),
    (["--shard-uds-path", "/tmp/x"], "router", ["--master-shard-uds-path", "/tmp/x-0"]),
    (["--master-addr", "10.1.1.1"], "shard_env", {"MASTER_ADDR": "10.1.1.1"}),
    (["--master-port", "30000"], "shard_env", {"MASTER_PORT": "30000"}),
    (["--huggingface-hub-cache", "/hc"], "shard_env", {"HUGGINGFACE_HUB_CACHE": "/hc"}),
    (["--huggingface-hub-cache", "/hc"], "download_env", {"HUGGINGFACE_HUB_CACHE": "/hc"}),
    (["--weights-cache-override", "/wc"], "shard_env", {"WEIGHTS_CACHE_OVERRIDE": "/wc"}),
    (["--weights-cache-override", "/wc"], "download_env", {"WEIGHTS_CACHE_OVERRIDE": "/wc"}),
    (["--disable-custom-kernels"], "shard_env", {"DISABLE_CUSTOM_KERNELS": "True"}),
    (["--cuda-memory-fraction", "0.5"], "shard_env", {"CUDA_MEMORY_FRACTION": "0.5"}),
    (["--json-output"], "download", ["--json-output"]),
    (["--json-output"], "shard", ["--json-output"]),
    (["--json-output"], "router", ["--json-output"]),
    (["--otlp-endpoint", "http://o:4317"], "shard", ["--otlp-endpoint", "http://o:4317"]),
    (["--otlp-endpoint", "http://o:4317"], "router", ["--otlp-endpoint", "http://o:4317"]),
    (["--cors-allow-origin", "https://x"], "router", ["--cors-allow-origin", "https://x"]),
    (["--watermark-gamma", "0.3"], "shard_env", {"WATERMARK_GAMMA": "0.3"}),
    (["--watermark-delta", "1.5"], "shard_env", {"WATERMARK_DELTA": "1.5"}),
    (["--ngrok", "--ngrok-authtoken", "t", "--ngrok-edge", "e"], "router",
     ["--ngrok", "--ngrok-authtoken", "t", "--ngrok-edge", "e"]),
]


def contains(sequence: list[str], fragment: list[str]) -> bool:
    return any(sequence[i:i + len(fragment)] == fragment for i in range(len(sequence) - len(fragment) + 1))


@pytest.mark.parametrize("args, target, fragment", PRODUCES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_flag_reaches_the_child(args: list[str], target: str, fragment: Any, launched: list[LauncherConfig]) -> None:
    produced = commands_of(parse(launched, args), {})[target]
    if isinstance(fragment, dict):
        assert {k: produced.get(k) for k in fragment} == fragment
    else:
        assert contains(produced, fragment), produced


def test_every_child_inherits_the_environment_and_gets_the_hub_token(launched: list[LauncherConfig]) -> None:
    produced = commands_of(parse(launched, []), {"HF_API_TOKEN": "hf_x", "KEEP": "me"})
    for name in ("download_env", "shard_env", "router_env"):
        assert produced[name]["HUGGING_FACE_HUB_TOKEN"] == "hf_x"
        assert produced[name]["KEEP"] == "me"  # children inherit the launcher's environment
        assert produced[name]["PYTHONUNBUFFERED"] == "1"  # their log lines are forwarded as they happen


def test_default_command_lines(launched: list[LauncherConfig]) -> None:
    """The exact command lines with every flag at its default: no optional flag sneaks in."""
    cfg = parse(launched, [])
    produced = commands_of(cfg, {})
    assert produced["download"] == ["lorax-server", "download-weights", "mistralai/Mistral-7B-Instruct-v0.1",
                                    "--source", "hub", "--adapter-source", "hub", "--logger-level", "INFO"]
    assert produced["shard"] == ["lorax-server", "serve", "/models/folder", "--uds-path", "/tmp/lorax-server",
                                 "--source", "hub", "--adapter-source", "hub", "--logger-level", "INFO"]
    assert produced["router"] == [
        "lorax-router", "--max-concurrent-requests", "128", "--max-best-of", "2", "--max-stop-sequences", "4",
        "--max-input-length", "1792", "--max-total-tokens", "2048", "--max-batch-prefill-tokens", "4096",
        "--max-active-adapters", "1024", "--adapter-cycle-time-s", "2", "--waiting-served-ratio", "1.2",
        "--max-waiting-tokens", "20", "--validation-workers", "2", "--hostname", "0.0.0.0", "--port", "3000",
        "--master-shard-uds-path", "/tmp/lorax-server-0", "--tokenizer-name", "/models/folder",
        "--model-id", "mistralai/Mistral-7B-Instruct-v0.1", "--adapter-source", "hub"]
    assert {k: produced["shard_env"].get(k) for k in (
        "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_MEMORY_FRACTION", "DISABLE_CUSTOM_KERNELS",
        "WATERMARK_GAMMA", "WATERMARK_DELTA", "HUGGINGFACE_HUB_CACHE", "WEIGHTS_CACHE_OVERRIDE",
        "HUGGING_FACE_HUB_TOKEN")} == {
        "RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
        "CUDA_MEMORY_FRACTION": "1.0", "DISABLE_CUSTOM_KERNELS": None, "WATERMARK_GAMMA": None,
        "WATERMARK_DELTA": None, "HUGGINGFACE_HUB_CACHE": None, "WEIGHTS_CACHE_OVERRIDE": None,
        "HUGGING_FACE_HUB_TOKEN": None}
