"""The transformers-backed path: causal LMs without a native family run their own transformers modeling code over our
paged KV cache and batched LoRA op, and their greedy tokens equal transformers(+peft) for mixed batches of base and
adapter requests that join mid-decode."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import PeftModel

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.models import implementation, load_model
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from tests.e2e import Launcher
from tests.test_router_support import FakeShard, router_stack, run
from tests.test_shard_exactness import PROMPTS, make_request, run_staggered
from tests.tiny_models import make_adapter, make_tokenizer

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
FAMILIES = {  # name -> (config class, extra config, two adapters' target modules in that family's own names)
    "gpt2": ("GPT2Config", dict(n_inner=128), (["c_attn"], ["c_attn", "c_proj", "c_fc"])),
    "gpt_neox": ("GPTNeoXConfig", dict(intermediate_size=128, rotary_pct=0.5),
                 (["query_key_value"], ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64),
            (["q_proj", "v_proj"], ["k_proj", "out_proj", "fc1", "fc2"])),
    "phi": ("PhiConfig", dict(intermediate_size=128, num_key_value_heads=2),
            (["q_proj", "v_proj", "dense"], ["fc1", "fc2"])),
    "starcoder2": ("Starcoder2Config", dict(intermediate_size=128, num_key_value_heads=2, sliding_window=6),
                   (["q_proj", "o_proj"], ["k_proj", "v_proj", "c_fc", "c_proj"])),
}


def make_family(name: str, folder, **overrides):
    """A tiny random model of a transformers-backed family (plus tokenizer) saved in `folder`."""
    import transformers

    torch.manual_seed(0)
    tokenizer = make_tokenizer(folder)
    config_cls, extra, _ = FAMILIES[name]
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, **{**SIZES, **extra, **overrides},
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights make greedy choices decisive, so float noise cannot flip a token
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    """n greedy tokens, EOS included (the server ignores EOS in these tests; generate's min_new_tokens would mask
    it)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, start:].tolist()


def expected_tokens(base_dir, adapter_dir, tokenizer, jobs: list[tuple[str, int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return [greedy(model.eval(), tokenizer, prompt, n) for prompt, n in jobs]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapters_match_transformers_and_peft(family, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    base = tmp_path / "base"
    model = make_family(family, base)
    targets = FAMILIES[family][2]
    adapters = [make_adapter(model, tmp_path / f"a{i}", i + 1, 8 * (i + 1), 16, t) for i, t in enumerate(targets)]
    with caplog.at_level(logging.INFO, logger="lorax_server.shard"):
        generator = build_service(str(base), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    assert f"{base} runs on the transformers path" in caplog.text
    generator.allocate_cache(2048)
    for i, folder in enumerate(adapters):
        generator.adapters.load(AdapterKey((str(folder),), "local"), i + 1)
    tok = generator.tokenizer
    # request j uses adapter j % 3 (0 = base): both batches mix the base model with both adapters
    jobs = [(PROMPTS[j % len(PROMPTS)], 8 + j % 3 * 3, j % 3) for j in range(6)]
    expected = {}
    for index in range(3):
        mine = [j for j, job in enumerate(jobs) if job[2] == index]
        answers = expected_tokens(base, adapters[index - 1] if index else None, tok, [jobs[j][:2] for j in mine])
        expected.update(zip(mine, answers))
    requests = []
    for j, (prompt, n, index) in enumerate(jobs):
        requests.append(make_request(tok, j, prompt, n))
        requests[-1].adapter_index = index
    ours = run_staggered(generator, requests, join_after=2)
    for j in range(len(jobs)):
        assert ours[j] == expected[j], f"{family} request {j} (adapter {jobs[j][2]})"
    assert len({tuple(ours[j]) for j in range(3)}) == 3, "adapters must change the output"
    assert generator.cache.free_blocks == generator.cache.num_blocks, "every block returns to the cache"


def test_adapter_targets_resolve_to_the_family_modules(tmp_path, monkeypatch):
    """GPT-2's `c_proj` names both attn.c_proj and mlp.c_proj (as in PEFT); lm_head is refused with the reason."""
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    model = make_family("gpt2", tmp_path / "base")
    ours = load_model(tmp_path / "base", None, torch.device("cpu"), Parallel())
    assert set(ours.lora_shapes()) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert ours.lora_shapes()["attn.c_attn"].out_features == 3 * 64
    service = build_service(str(tmp_path / "base"), None, "hub", None, Parallel(), torch.device("cpu"), "/u")
    registry = service.generator.adapters
    folder = make_adapter(model, tmp_path / "proj", 1, 4, 8, ["c_proj"])
    assert set(registry.fetch(AdapterKey((str(folder),), "local")).modules) == {"attn.c_proj", "mlp.c_proj"}
    head = make_adapter(model, tmp_path / "head", 1, 4, 8, ["c_proj"])
    config = json.loads((head / "adapter_config.json").read_text())
    (head / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_proj", "lm_head"]}))
    with pytest.raises(AdapterError, match="targets lm_head, which this server cannot apply .supported: attn.c_attn"):
        registry.fetch(AdapterKey((str(head),), "local"))


def test_unsupported_models_are_refused_with_the_reason(tmp_path):
    cpu = torch.device("cpu")
    xglm = tmp_path / "xglm"
    import transformers

    config = transformers.XGLMConfig(d_model=32, num_layers=1, attention_heads=2, ffn_dim=64, vocab_size=64)
    transformers.XGLMForCausalLM(config).save_pretrained(xglm)
    with pytest.raises(ValueError, match="'XGLMForCausalLM'.*does not support custom attention backends"):
        load_model(xglm, None, cpu, Parallel())
    make_family("gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel runs on the transformers-backed path.*--num-shard 1"):
        load_model(tmp_path / "gpt2", None, cpu, Parallel(rank=0, world_size=2))
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    with pytest.raises(ValueError, match="sets a sliding window that its attention calls do not pass on"):
        load_model(tmp_path / "gpt2", None, cpu, Parallel())  # the probe sees GPT-2's attention ignore it
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"], "model_type": "nope"}))
    with pytest.raises(ValueError, match="unsupported architecture 'NopeForCausalLM': transformers does not know model "
                                         "type 'nope'$"):
        load_model(unknown, None, cpu, Parallel())


REMOTE_CONFIG = '''from transformers import GPT2Config


class TinyRemoteConfig(GPT2Config):
    model_type = "tiny_remote"
'''
REMOTE_MODEL = '''from transformers import GPT2LMHeadModel

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(GPT2LMHeadModel):
    config_class = TinyRemoteConfig
'''


def test_remote_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    """A checkpoint whose modeling code ships with it (`auto_map`): refused without the flag, served with it, and
    equal to transformers running the same code."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "remote"
    make_family("gpt2", folder)
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config))
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="'TinyRemoteForCausalLM'.*model type 'tiny_remote' .its modeling code ships "
                                         "with the checkpoint: --trust-remote-code runs it"):
        load_model(folder, None, cpu, Parallel())
    service = build_service(str(folder), None, "hub", None, Parallel(), cpu, "/unused", trust_remote_code=True)
    generator = service.generator
    assert type(generator.model.hf).__name__ == "TinyRemoteForCausalLM"
    generator.allocate_cache(1024)
    tok = generator.tokenizer
    ours = run_staggered(generator, [make_request(tok, i, p, 6) for i, p in enumerate(PROMPTS)])
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    for i, prompt in enumerate(PROMPTS):
        assert ours[i] == greedy(reference, tok, prompt, 6)


def test_info_names_the_path(tmp_path, monkeypatch):
    """The shard's Info RPC says which path serves the model and the router's /info passes it on."""
    make_family("gpt_neox", tmp_path / "neox")
    service = build_service(str(tmp_path / "neox"), None, "hub", None, Parallel(), torch.device("cpu"), "/unused")
    assert implementation(service.generator.model) == "transformers"
    info = run(service.Info(pb.InfoRequest(), None))
    assert info.model_implementation == "transformers" and not info.HasField("window_size")

    async def transformers_info(self, request, context):
        return pb.InfoResponse(dtype="torch.float32", device_type="cpu", block_size=16, supports_generation=True,
                               model_implementation="transformers")

    monkeypatch.setattr(FakeShard, "Info", transformers_info)

    async def scenario():
        async with router_stack("--max-input-length", "10", "--max-total-tokens", "20") as stack:
            return (await stack.http.get("/info")).json()

    assert run(scenario())["model_implementation"] == "transformers"


@pytest.mark.e2e
def test_launcher_serves_gpt2_with_adapters(tmp_path):
    """Through the real launcher: the shard's log names the path, /info reports it, and concurrent base and adapter
    requests on GPT-2 (Conv1D c_attn) equal transformers + peft."""
    base = tmp_path / "base"
    model = make_family("gpt2", base)
    targets = FAMILIES["gpt2"][2]
    adapters = [make_adapter(model, tmp_path / f"a{i}", i + 1, 8, 16, t) for i, t in enumerate(targets)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    jobs = [(index, prompt) for index in (None, 0, 1) for prompt in PROMPTS[:3]]
    expected = {}
    for index in (None, 0, 1):
        answers = expected_tokens(base, None if index is None else adapters[index], tok, [(p, 6) for p in PROMPTS[:3]])
        expected.update({(index, p): a for p, a in zip(PROMPTS[:3], answers)})

    def ask(job):
        params = {"max_new_tokens": 6, "details": True, "ignore_eos_token": True}
        if job[0] is not None:
            params.update(adapter_id=str(adapters[job[0]]), adapter_source="local")
        reply = httpx.post(launcher.url + "/generate", json={"inputs": job[1], "parameters": params}, timeout=300)
        assert reply.status_code == 200, reply.text
        return [t["id"] for t in reply.json()["details"]["tokens"]]

    launcher = Launcher(str(base), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64").wait_ready()
    try:
        assert "runs on the transformers path" in launcher.output()
        assert httpx.get(launcher.url + "/info").json()["model_implementation"] == "transformers"
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = dict(zip(jobs, pool.map(ask, jobs)))
    finally:
        launcher.stop()
    for job in jobs:
        assert got[job] == expected[job], f"adapter {job[0]}, prompt {job[1]!r}"
