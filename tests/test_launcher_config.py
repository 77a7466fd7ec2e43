"""The launcher's cross-flag rules and derived values, checked before anything is spawned."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorax_launcher import cli
from lorax_launcher.commands import shard_command
from lorax_launcher.config import (ConfigError, LauncherConfig, bindable_host, find_num_shards, model_limit,
                                   split_model_id, token_limits)
from lorax_launcher.logs import child_line, log_level

REPO = Path(__file__).resolve().parents[1]
CLEAN_ENV = {var: None for var in ("MODEL_ID", "HOSTNAME", "PORT", "REVISION", "NUM_SHARD", "SHARDED", "QUANTIZE",
                                   "DTYPE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NGROK",
                                   "MAX_INPUT_LENGTH", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS",
                                   "MAX_BATCH_TOTAL_TOKENS", "VALIDATION_WORKERS")}


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[LauncherConfig]:
    configs: list[LauncherConfig] = []
    monkeypatch.setattr(cli, "launch", lambda cfg: configs.append(cfg) or 0)
    return configs


REFUSED = [
    (["--model-id", "org/m@v1", "--revision", "v2"], "--revision"),
    (["--validation-workers", "0"], "--validation-workers must be > 0"),
    (["--max-input-length", "2048", "--max-total-tokens", "2048"],
     "--max-input-length (2048) must be < --max-total-tokens (2048)"),
    (["--max-input-length", "3000"], "--max-input-length (3000) must be < --max-total-tokens (2048, derived"),
    (["--max-input-length", "1000", "--max-batch-prefill-tokens", "999"],
     "--max-batch-prefill-tokens (999) must be >= --max-input-length (1000)"),
    (["--max-total-tokens", "4000", "--max-batch-total-tokens", "3000"],
     "--max-total-tokens (4000) must be <= --max-batch-total-tokens (3000)"),
    (["--max-batch-prefill-tokens", "5000", "--max-batch-total-tokens", "4500"],
     "--max-batch-prefill-tokens (5000) must be <= --max-batch-total-tokens (4500)"),
    (["--quantize", "gptq", "--dtype", "float16"], "--dtype (float16) cannot be used with --quantize (gptq)"),
    (["--sharded", "false", "--num-shard", "2"], "--sharded false cannot be used with --num-shard 2"),
    (["--sharded", "true", "--num-shard", "1"], "--sharded true cannot be used with --num-shard 1"),
    (["--sharded", "true"], "--sharded true without --num-shard needs CUDA_VISIBLE_DEVICES"),
    (["--num-shard", "0"], "--num-shard must be >= 1"),
    (["--ngrok"], "--ngrok requires --ngrok-authtoken and --ngrok-edge"),
    (["--ngrok", "--ngrok-authtoken", "t"], "--ngrok requires --ngrok-edge"),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_refused_combinations_exit_1_with_one_line(args: list[str], message: str, launched: list) -> None:
    result = CliRunner().invoke(cli.main, args, env=CLEAN_ENV)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ArgumentValidation: "), result.output
    assert message in lines[0]
    assert not launched, "nothing may be launched after a refused configuration"


@pytest.mark.parametrize("value", ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq"])
def test_every_quantize_value_is_launched_without_a_gpu(value: str, launched: list) -> None:
    """The CPU runs every format (lorax_server.quantization); the shard checks the checkpoint suits it."""
    result = CliRunner().invoke(cli.main, ["--quantize", value], env=CLEAN_ENV)
    assert result.exit_code == 0, result.output
    command = shard_command(launched[0], "/models/m")
    assert command[command.index("--quantize") + 1] == value


def test_too_few_gpus_for_sharding_is_its_own_error(launched: list) -> None:
    result = CliRunner().invoke(cli.main, ["--sharded", "true"], env={**CLEAN_ENV, "CUDA_VISIBLE_DEVICES": "0"})
    assert result.exit_code == 1
    assert result.output.startswith("Error: NotEnoughCUDADevices: --sharded true needs more than one GPU")


def test_bad_choice_is_a_usage_error(launched: list) -> None:
    result = CliRunner().invoke(cli.main, ["--dtype", "float64"], env=CLEAN_ENV)
    assert result.exit_code == 2 and "float64" in result.output and not launched


def test_refusal_from_a_real_process_is_on_stderr() -> None:
    env = {"PATH": "/usr/bin:/bin", "MAX_INPUT_LENGTH": "4096"}
    done = subprocess.run([sys.executable, "-m", "lorax_launcher"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ArgumentValidation: --max-input-length (4096)")


def test_split_model_id(tmp_path: Path) -> None:
    assert split_model_id("org/m@v1", None) == ("org/m", "v1")
    assert split_model_id("org/m", "v2") == ("org/m", "v2")
    local = tmp_path / "model@2024"
    local.mkdir()
    assert split_model_id(str(local), None) == (str(local), None)  # an existing path is never split
    with pytest.raises(ConfigError, match="--revision"):
        split_model_id("org/m@v1", "v2")


@pytest.mark.parametrize("model_config, limit", [
    ({"max_position_embeddings": 1024}, 1024),
    ({"max_seq_len": 512}, 512),
    ({"n_positions": 300}, 300),
    ({"max_position_embeddings": 32768}, 4096),
    ({"hidden_size": 8}, 4096),
])
def test_model_limit_from_a_local_config(tmp_path: Path, model_config: dict, limit: int) -> None:
    (tmp_path / "config.json").write_text(json.dumps(model_config))
    assert model_limit(str(tmp_path)) == limit


def test_model_limit_is_the_cap_for_a_hub_id() -> None:
    assert model_limit("org/not-here") == 4096


@pytest.mark.parametrize("limit, given, derived", [
    (4096, (None, None, None, None), (1792, 2048, 4096)),  # the documented defaults
    (1024, (None, None, None, None), (1023, 1024, 4096)),  # a short model lowers them
    (512, (100, None, None, None), (100, 512, 4096)),
    (4096, (None, 8192, None, None), (1792, 8192, 4096)),  # given values win
    (4096, (5000, 8192, None, None), (5000, 8192, 5000)),  # prefill covers a long input
    (4096, (None, None, None, 1000), (999, 1000, 1000)),  # and a small batch budget caps what is derived
])
def test_token_limits(limit: int, given: tuple, derived: tuple) -> None:
    assert token_limits(limit, *given) == derived


def test_derived_limits_reach_the_config_through_the_cli(tmp_path: Path, launched: list) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    result = CliRunner().invoke(cli.main, ["--model-id", str(tmp_path)], env=CLEAN_ENV)
    assert result.exit_code == 0, result.output
    cfg = launched[0]
    assert (cfg.max_input_length, cfg.max_total_tokens, cfg.max_batch_prefill_tokens) == (511, 512, 4096)


def test_explicit_documented_default_is_taken_as_given(tmp_path: Path, launched: list) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    result = CliRunner().invoke(cli.main, ["--model-id", str(tmp_path), "--max-total-tokens", "2048"],
                                env=CLEAN_ENV)
    assert result.exit_code == 0, result.output
    assert launched[0].max_total_tokens == 2048 and launched[0].max_input_length == 1792


@pytest.mark.parametrize("sharded, num_shard, env, expected", [
    (None, None, {}, 1),
    (None, None, {"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    (None, None, {"NVIDIA_VISIBLE_DEVICES": "0,1"}, 2),
    (None, None, {"CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "0,1"}, 1),
    (None, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 2),
    (False, None, {"CUDA_VISIBLE_DEVICES": "0,1"}, 1),
    (False, 1, {}, 1),
    (True, None, {"CUDA_VISIBLE_DEVICES": "2,3"}, 2),
    (True, 4, {}, 4),
])
def test_find_num_shards(sharded: bool | None, num_shard: int | None, env: dict, expected: int) -> None:
    assert find_num_shards(sharded, num_shard, env) == expected


@pytest.mark.parametrize("hostname, expected", [
    ("0.0.0.0", "0.0.0.0"),
    ("127.0.0.1", "127.0.0.1"),
    ("localhost", "localhost"),
    ("no-such-host.invalid", "0.0.0.0"),  # e.g. a pod name that does not resolve
    ("192.0.2.1", "0.0.0.0"),  # resolves, but is not an address of this machine
])
def test_bindable_host(hostname: str, expected: str, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("lorax_launcher")
    logger.addHandler(caplog.handler)
    try:
        assert bindable_host(hostname) == expected
    finally:
        logger.removeHandler(caplog.handler)
    assert (hostname in caplog.text) == (expected != hostname)


def test_child_lines() -> None:
    assert child_line("shard-0", "hello", json_output=False) == "[shard-0] hello"
    assert child_line("shard-0", '{"text": "hi"}', json_output=True) == '{"text": "hi"}'
    wrapped = json.loads(child_line("router", "plain", json_output=True))
    assert (wrapped["target"], wrapped["message"]) == ("router", "plain")


@pytest.mark.parametrize("spec, level", [
    (None, logging.INFO), ("debug", logging.DEBUG), ("warn", logging.WARNING),
    ("lorax_launcher=debug,error", logging.ERROR), ("nonsense", logging.INFO),
])
def test_log_level(spec: str | None, level: int) -> None:
    assert log_level(spec) == level


def test_flags_table_lists_every_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "lorax_launcher.flags_table"], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.strip().splitlines()
    assert rows[0] == "| Flag | Env var | Default | Description |"
    assert "| `--max-input-length` | `MAX_INPUT_LENGTH` | `1792` |" in done.stdout
    assert "| `-p, --port` | `PORT` | `3000` |" in done.stdout
    assert len(rows) == 2 + len(cli.main.params)
