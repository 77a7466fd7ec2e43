"""End to end through the real launcher: adapters of the published mix (ranks 8-64, every target set, rsLoRA, alpha
above and below r) share batches with base requests, and 200 adapters cycle through 4 device slots while requests
run. Every answer equals transformers + peft token for token, so a token served from a wrong slot or stale rows
cannot pass."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.e2e import Launcher
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.e2e

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIX = [  # (r, lora_alpha, targets, use_rslora)
    (8, 16, ["q_proj", "v_proj"], False),
    (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    (32, 64, ALL, True),
    (64, 32, ["gate_proj", "up_proj", "down_proj"], False),
    (8, 4, ALL, False),
    (16, 32, ["gate_proj", "up_proj", "down_proj"], True),
    (32, 16, ["q_proj", "v_proj"], False),
    (64, 128, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
]
ADAPTERS = 200
SLOTS = 4
NEW_TOKENS = 5
PROMPTS = ["What is the capital", "Hello world", "The quick brown fox jumps", "LoRA adapters change",
           "Serving thousands of adapters", "Numbers like 12345"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama, 200 adapters of the published mix with their transformers+peft answers, and a launcher with
    only 4 active adapters."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("slots")
    base = work / "base"
    model = make_model("llama", base)
    tok = AutoTokenizer.from_pretrained(base)
    adapters, expected = [], {}
    for i in range(ADAPTERS):
        r, alpha, targets, rslora = MIX[i % len(MIX)]
        adapters.append(make_adapter(model, work / f"a{i}", i + 1, r, alpha, targets, use_rslora=rslora))

    def reference(peft_or_base, prompt: str) -> list[int]:
        """Greedy tokens, EOS included (the requests ignore it; generate's min_new_tokens would forbid it)."""
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, peft_or_base(ids).logits[:, -1:].argmax(-1)], dim=1)
        return ids[0, -NEW_TOKENS:].tolist()

    with torch.no_grad():
        for prompt in PROMPTS:
            expected[(None, prompt)] = reference(model, prompt)
        for i, folder in enumerate(adapters):
            peft_model = PeftModel.from_pretrained(model, folder)
            prompt = PROMPTS[i % len(PROMPTS)]
            expected[(i, prompt)] = reference(peft_model, prompt)
            model = peft_model.unload()
    launcher = Launcher(str(base), work, "--max-active-adapters", str(SLOTS), "--adapter-cycle-time-s", "1",
                        "--max-input-length", "32", "--max-total-tokens", "64", "--adapter-source", "local").wait_ready()
    yield launcher, adapters, expected
    launcher.stop()


def ask(url: str, prompt: str, adapter) -> list[int]:
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos_token": True}
    if adapter is not None:
        params.update(adapter_id=str(adapter), adapter_source="local")
    reply = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=300)
    assert reply.status_code == 200, reply.text
    return [t["id"] for t in reply.json()["details"]["tokens"]]


def run_all(url: str, jobs: list[tuple[int | None, str]], adapters, clients: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        futures = {job: pool.submit(ask, url, job[1], None if job[0] is None else adapters[job[0]]) for job in jobs}
    return {job: f.result() for job, f in futures.items()}


def test_published_mix_with_base_rows_matches_peft(served):
    launcher, adapters, expected = served
    jobs = [(i, PROMPTS[i % len(PROMPTS)]) for i in range(len(MIX))] + [(None, p) for p in PROMPTS[:4]]
    got = run_all(launcher.url, jobs, adapters, clients=len(jobs))
    for job, tokens in got.items():
        assert tokens == expected[job], f"adapter {job[0]} (mix {MIX[job[0] % len(MIX)] if job[0] is not None else 'base'})"
    assert len({tuple(t) for t in got.values()}) > len(MIX) // 2, "adapters must change the output"


def test_200_adapters_cycle_through_4_slots_and_match_peft(served):
    launcher, adapters, expected = served
    jobs = [(i, PROMPTS[i % len(PROMPTS)]) for i in range(ADAPTERS)]
    jobs += [(i, PROMPTS[i % len(PROMPTS)]) for i in range(0, ADAPTERS, 7)]  # reloads, into other slots and rows
    jobs = sorted(set(jobs), key=lambda j: (j[0] * 37) % ADAPTERS) + [(None, p) for p in PROMPTS]
    got = run_all(launcher.url, jobs, adapters, clients=12)
    wrong = [job for job, tokens in got.items() if tokens != expected[job]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} answers differ from peft, e.g. adapter {wrong[0][0]}"
    info = httpx.get(launcher.url + "/info").json()["adapter_tiers"]
    assert info["device"]["adapters"] <= SLOTS
    assert info["device_pool"]["bytes"] >= info["device"]["bytes"] > 0 or info["device"]["adapters"] == 0
    launcher.log.flush()
    launcher.log.seek(0)
    loads = re.findall(r"loaded at index (\d+) into slot (\d+)", launcher.log.read())
    slots_of: dict[str, set[str]] = {}
    for index, slot in loads:
        slots_of.setdefault(index, set()).add(slot)
    assert len(loads) >= ADAPTERS, "every adapter was loaded"
    assert any(len(s) > 1 for s in slots_of.values()), "reloaded adapters land in other slots"
