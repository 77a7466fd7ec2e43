"""The launcher's supervision, over real processes: stand-in `lorax-server` / `lorax-router` scripts on PATH.

The stand-ins record their pids (and a grandchild's) so the tests can check that no process outlives the
launcher, whichever way it ends.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_SERVER = """
import json, os, signal, subprocess, sys, time
from pathlib import Path

state = Path(os.environ["FAKE_STATE"])
mode = os.environ.get("FAKE_MODE", "")
if sys.argv[1] == "download-weights":
    (state / "download.json").write_text(json.dumps(sys.argv[1:]))
    print("downloading", flush=True)
    if mode == "download-fails":
        print("model not found: nope/nope", file=sys.stderr, flush=True)
        sys.exit(3)
    sys.exit(0)

rank = int(os.environ["RANK"])
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
(state / f"shard-{rank}.json").write_text(json.dumps({
    "argv": sys.argv[1:], "pids": [os.getpid(), grandchild.pid],
    "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}}))
if mode == f"fail-start-{rank}":
    time.sleep(0.5)
    print(f"shard {rank}: cannot load the model", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
uds = sys.argv[sys.argv.index("--uds-path") + 1]
Path(f"{uds}-{rank}").touch()
print(json.dumps({"text": f"shard {rank} ready", "record": {"level": {"name": "INFO"}}}), flush=True)
print(f"plain text from shard {rank}", flush=True)
if mode == f"crash-{rank}":
    time.sleep(1.0)
    print(f"shard {rank}: CUDA error: device-side assert", file=sys.stderr, flush=True)
    sys.exit(1)
time.sleep(300)
"""

FAKE_ROUTER = """
import json, os, sys, time
from pathlib import Path

state = Path(os.environ["FAKE_STATE"])
(state / "router.json").write_text(json.dumps({"argv": sys.argv[1:], "pids": [os.getpid()]}))
print("router listening", flush=True)
if os.environ.get("FAKE_MODE") == "router-crash":
    time.sleep(0.5)
    print("router: address already in use", file=sys.stderr, flush=True)
    sys.exit(1)
time.sleep(300)
"""

LAUNCHER_ENV_VARS = ("MODEL_ID", "ADAPTER_ID", "REVISION", "SHARDED", "NUM_SHARD", "HOSTNAME", "PORT", "JSON_OUTPUT",
                     "DOWNLOAD_ONLY", "SHARD_UDS_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "QUANTIZE")


def _write_script(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """A PATH with the stand-ins, a local model folder, a state folder and a socket base path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_script(bin_dir / "lorax-server", FAKE_SERVER)
    _write_script(bin_dir / "lorax-router", FAKE_ROUTER)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_STATE=str(state))
    return {"env": env, "model": model, "state": state, "uds": str(tmp_path / "sock")}


def start(world: dict, *args: str, mode: str = "", num_shard: int = 2) -> subprocess.Popen:
    env = {**world["env"], "FAKE_MODE": mode}
    argv = [sys.executable, "-m", "lorax_launcher", "--model-id", str(world["model"]), "--num-shard",
            str(num_shard), "--shard-uds-path", world["uds"], "--hostname", "127.0.0.1", "--port", "0", *args]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def finish(launcher: subprocess.Popen, timeout: float = 10.0) -> tuple[int, str, str, float]:
    """Wait for the launcher: (exit code, stdout, stderr, seconds it took)."""
    start_time = time.monotonic()
    try:
        out, err = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.kill()
        out, err = launcher.communicate()
        raise AssertionError(f"launcher did not exit within {timeout}s\n{out}\n{err}")
    return launcher.returncode, out, err, time.monotonic() - start_time


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a reaped-by-init zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def recorded_pids(state: Path) -> list[int]:
    return [pid for f in state.glob("*.json") if f.name != "download.json"
            for pid in json.loads(f.read_text())["pids"]]


def assert_no_survivors(state: Path) -> None:
    pids = recorded_pids(state)
    assert pids, "the stand-ins never started"
    try:
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=3.0)
    except AssertionError:
        survivors = [pid for pid in pids if alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"processes left behind: {survivors}")


def test_sigterm_stops_router_then_shards_and_exits_0(world: dict) -> None:
    launcher = start(world)
    wait_for(lambda: (world["state"] / "router.json").exists())
    launcher.send_signal(signal.SIGTERM)
    code, out, err, _ = finish(launcher)
    assert code == 0, err
    assert_no_survivors(world["state"])
    assert "[shard-1] plain text from shard 1" in out
    assert "[router] router listening" in out
    shard1 = json.loads((world["state"] / "shard-1.json").read_text())
    assert shard1["env"] == {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    assert shard1["argv"][:2] == ["serve", str(world["model"].resolve())]
    assert "--sharded" in shard1["argv"]
    router = json.loads((world["state"] / "router.json").read_text())["argv"]
    assert router[router.index("--tokenizer-name") + 1] == str(world["model"].resolve())
    assert router[router.index("--master-shard-uds-path") + 1] == world["uds"] + "-0"
    assert router[router.index("--max-total-tokens") + 1] == "1024"  # derived from the model's config.json


def test_sigint_works_like_sigterm(world: dict) -> None:
    launcher = start(world, num_shard=1)
    wait_for(lambda: (world["state"] / "router.json").exists())
    launcher.send_signal(signal.SIGINT)
    code, _, err, _ = finish(launcher)
    assert code == 0, err
    assert_no_survivors(world["state"])


def test_shard_crash_stops_everything_and_exits_1_quickly(world: dict) -> None:
    launcher = start(world, mode="crash-1")
    code, out, err, took = finish(launcher)
    assert code == 1
    assert took < 10
    assert "Shard 1 crashed" in out
    assert "CUDA error: device-side assert" in err
    assert err.strip().endswith("Error: ShardFailed")
    assert_no_survivors(world["state"])


def test_shard_that_fails_to_start_is_reported_and_the_router_never_starts(world: dict) -> None:
    Path(world["uds"] + "-0").touch()  # a stale socket must not pass for a ready shard
    launcher = start(world, mode="fail-start-0")
    code, _, err, _ = finish(launcher)
    assert code == 1
    assert "shard 0: cannot load the model" in err
    assert err.strip().endswith("Error: ShardCannotStart")
    assert not (world["state"] / "router.json").exists()
    assert_no_survivors(world["state"])


def test_router_crash_stops_shards_and_exits_1(world: dict) -> None:
    launcher = start(world, mode="router-crash")
    code, out, err, took = finish(launcher)
    assert code == 1
    assert took < 10
    assert "Webserver Crashed" in out
    assert "address already in use" in err
    assert err.strip().endswith("Error: WebserverFailed")
    assert_no_survivors(world["state"])


def test_shard_ignoring_sigterm_is_killed(world: dict) -> None:
    launcher = start(world, mode="ignore-sigterm", num_shard=1)
    wait_for(lambda: (world["state"] / "router.json").exists())
    launcher.send_signal(signal.SIGTERM)
    code, _, err, _ = finish(launcher, timeout=15)
    assert code == 0, err
    assert_no_survivors(world["state"])


def test_download_failure_exits_1_before_any_shard(world: dict) -> None:
    code, _, err, _ = finish(start(world, mode="download-fails"))
    assert code == 1
    assert "model not found: nope/nope" in err
    assert err.strip().endswith("Error: DownloadError")
    assert not list(world["state"].glob("shard-*.json"))


def test_download_only_exits_0_after_the_download(world: dict) -> None:
    code, _, err, _ = finish(start(world, "--download-only", "--revision", "v1"))
    assert code == 0, err
    assert json.loads((world["state"] / "download.json").read_text()) == [
        "download-weights", str(world["model"]), "--source", "hub", "--adapter-source", "hub",
        "--revision", "v1", "--logger-level", "INFO"]
    assert not list(world["state"].glob("shard-*.json"))


def test_invalid_flags_fail_before_anything_is_spawned(world: dict) -> None:
    code, out, err, _ = finish(start(world, "--max-input-length", "4000", "--max-total-tokens", "3000"))
    assert code == 1
    assert err.strip() == ("Error: ArgumentValidation: --max-input-length (4000) must be < "
                           "--max-total-tokens (3000)")
    assert not list(world["state"].iterdir())


def test_json_output_passes_json_lines_through_and_wraps_the_rest(world: dict) -> None:
    launcher = start(world, "--json-output", num_shard=1)
    wait_for(lambda: (world["state"] / "router.json").exists())
    launcher.send_signal(signal.SIGTERM)
    code, out, err, _ = finish(launcher)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # every line is JSON
    assert {"text": "shard 0 ready", "record": {"level": {"name": "INFO"}}} in lines
    assert any(line.get("target") == "shard-0" and line.get("message") == "plain text from shard 0"
               for line in lines)
    shard0 = json.loads((world["state"] / "shard-0.json").read_text())
    assert "--json-output" in shard0["argv"] and "--sharded" not in shard0["argv"]
