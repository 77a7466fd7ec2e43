"""Mixed-adapter batches on the shard equal transformers + peft, token for token."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import POOL_DTYPE_ENV, AdapterKey, pool_dtype
from lorax_server.dist import Parallel
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from tests.test_shard_exactness import PROMPTS, make_request, run_staggered
from tests.tiny_models import ARCHS, make_adapter, make_model

ADAPTERS = [  # (r, alpha, targets)
    (8, 16, ["q_proj", "v_proj"]),
    (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (4, 8, ["gate_proj", "up_proj", "down_proj"]),
    (32, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
]


def reference(base_dir, adapter_dir, tokenizer, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_adapters_match_peft(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    base = tmp_path / "base"
    model = make_model(arch, base)
    adapter_dirs = [make_adapter(model, tmp_path / f"a{i}", i + 1, r, a, t) for i, (r, a, t) in enumerate(ADAPTERS)]
    generator = build_service(str(base), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    generator.allocate_cache(4096)
    for i, d in enumerate(adapter_dirs):
        generator.adapters.load(AdapterKey((str(d),), "local"), i + 1)
    tok = generator.tokenizer
    # request j uses adapter j % 5 (0 = base), so every batch mixes base and several ranks/targets
    requests, expected = [], []
    for j in range(8):
        prompt, index = PROMPTS[j % len(PROMPTS)], j % 5
        req = make_request(tok, j, prompt, 6 + j % 3)
        req.adapter_index = index
        requests.append(req)
        expected.append(reference(base, adapter_dirs[index - 1] if index else None, tok, prompt, 6 + j % 3))
    ours = run_staggered(generator, requests, join_after=2)
    for j in range(8):
        assert ours[j] == expected[j], f"{arch} request {j} (adapter {j % 5})"
    assert len({tuple(v) for v in ours.values()}) > 4, "adapters must change the output"


def test_a_static_adapter_applies_to_requests_naming_none(tmp_path, monkeypatch):
    """--adapter-id loads an adapter at index 0: requests naming no adapter run it, alone and beside another."""
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    base = tmp_path / "base"
    model = make_model(ARCHS[0], base)
    (r, a, t), (r2, a2, t2) = ADAPTERS[2], ADAPTERS[0]  # the static one on the MLP, the other on attention only
    static, other = make_adapter(model, tmp_path / "static", 1, r, a, t), make_adapter(model, tmp_path / "other", 2, r2, a2, t2)
    generator = build_service(str(base), None, "hub", None, Parallel(), torch.device("cpu"), "/unused",
                              adapter_id=str(static), adapter_source="local").generator
    generator.allocate_cache(4096)
    generator.adapters.load(AdapterKey((str(other),), "local"), 1)
    tok = generator.tokenizer
    for indices in ([0, 0], [0, 1]):  # only the static adapter; then beside an adapter targeting other modules
        requests = []
        for j, index in enumerate(indices):
            requests.append(make_request(tok, j, PROMPTS[j], 6))
            requests[-1].adapter_index = index
        ours = run_staggered(generator, requests, join_after=0)
        for j, index in enumerate(indices):
            assert ours[j] == reference(base, static if index == 0 else other, tok, PROMPTS[j], 6), (indices, j)


def test_bfloat16_pools_hold_half_the_bytes_and_stay_close(tmp_path, monkeypatch):
    """LORAX_ADAPTER_DTYPE=bfloat16 on CPU: pools in bfloat16, half the bytes, and a mixed batch's logits within the
    rounding of the adapter weights of the float32 pools' (greedy tokens can flip where two are nearly tied)."""
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    base = tmp_path / "base"
    model = make_model(ARCHS[0], base)
    adapter_dirs = [make_adapter(model, tmp_path / f"a{i}", i + 1, r, a, t) for i, (r, a, t) in enumerate(ADAPTERS)]
    logits, held = {}, {}
    for dtype in ("float32", "bfloat16"):
        monkeypatch.setenv(POOL_DTYPE_ENV, dtype)
        generator = build_service(str(base), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
        generator.allocate_cache(4096)
        for i, d in enumerate(adapter_dirs):
            generator.adapters.load(AdapterKey((str(d),), "local"), i + 1)
        assert {p.a.dtype for p in generator.adapters.pools.pools.values()} == {getattr(torch, dtype)}
        held[dtype] = generator.adapters.pools.bytes_used
        requests = []
        for j in range(5):  # the base model and each adapter
            requests.append(make_request(generator.tokenizer, j, PROMPTS[j % len(PROMPTS)], 2))
            requests[-1].adapter_index = j
        seen = []
        advance = generator._advance
        monkeypatch.setattr(generator, "_advance", lambda batch, step, details: seen.append(step) or advance(batch, step, details))
        generator.prefill(generator.new_batch(pb.Batch(id=0, requests=requests)))
        for r in requests:
            r.adapter_index = 0
        generator.prefill(generator.new_batch(pb.Batch(id=1, requests=requests)))
        logits[dtype], base_logits = seen
    assert held["bfloat16"] * 2 == held["float32"]
    error = (logits["bfloat16"] - logits["float32"]).abs().amax(-1)
    delta = (logits["float32"] - base_logits).abs().amax(-1)  # what each row's adapter changes
    assert error[0] == 0 and delta[0] == 0, "base-model rows do not touch the pools"
    assert (error[1:] > 0).all(), "the bfloat16 pools are the ones read"
    assert (error[1:] <= 0.05 * delta[1:]).all(), (error, delta)


def test_adapter_dtype_values(monkeypatch):
    monkeypatch.setenv(POOL_DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match="must be bfloat16"):
        pool_dtype(torch.float32, torch.device("cpu"))
    monkeypatch.setenv(POOL_DTYPE_ENV, "bfloat16")
    with pytest.raises(ValueError, match="applies on CPU"):
        pool_dtype(torch.float16, torch.device("cuda", 0))
    assert pool_dtype(torch.float32, torch.device("cpu")) == torch.bfloat16
    monkeypatch.delenv(POOL_DTYPE_ENV)
    assert pool_dtype(torch.float32, torch.device("cpu")) == torch.float32


def test_bad_adapters_are_refused_with_reason(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    folder, model = tiny_model_dir
    registry = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator.adapters
    with pytest.raises(AdapterError, match="does not exist"):
        registry.fetch(AdapterKey((str(tmp_path / "missing"),), "local"))
    (tmp_path / "notlora").mkdir()
    (tmp_path / "notlora" / "config.json").write_text("{}")
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        registry.fetch(AdapterKey((str(tmp_path / "notlora"),), "local"))
    with pytest.raises(AdapterError, match="outside the allowed roots"):
        registry.fetch(AdapterKey(("/etc",), "local"))
    other = make_model("llama", tmp_path / "big", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    wrong = make_adapter(other, tmp_path / "wrong", 1, 4, 8, ["q_proj"])
    with pytest.raises(AdapterError, match="do not fit the base model"):
        registry.fetch(AdapterKey((str(wrong),), "local"))
    import json

    def edited(name: str, **changes) -> str:
        """A copy of a q,v rank-8 adapter whose adapter_config.json says otherwise."""
        folder = make_adapter(model, tmp_path / name, 7, 8, 16, ["q_proj", "v_proj"])
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return str(folder)

    with pytest.raises(AdapterError, match="says r=3, but its q_proj weights have rank 8"):
        registry.fetch(AdapterKey((edited("rank", r=3),), "local"))
    with pytest.raises(AdapterError, match="disagree on target modules .weights for v_proj not targeted"):
        registry.fetch(AdapterKey((edited("targets", target_modules=["q_proj"]),), "local"))
    with pytest.raises(AdapterError, match="k_proj targeted without weights"):
        registry.fetch(AdapterKey((edited("absent", target_modules=["q_proj", "k_proj", "v_proj"]),), "local"))
    with pytest.raises(AdapterError, match="targets lm_head, which this server cannot apply"):
        registry.fetch(AdapterKey((edited("head", target_modules=["q_proj", "v_proj", "lm_head"]),), "local"))
    with pytest.raises(AdapterError, match=r"trained for '.*big' \(LlamaForCausalLM, hidden size 32\), but this server "
                                           r"runs '.*' \(LlamaForCausalLM, hidden size 64\)"):
        registry.fetch(AdapterKey((edited("otherbase", base_model_name_or_path=str(tmp_path / "big")),), "local"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((wrong / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="corrupt"):
        registry.fetch(AdapterKey((str(corrupt),), "local"))
