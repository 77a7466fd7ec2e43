"""Mixed-adapter batches on the shard equal transformers + peft, token for token."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
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


def test_bad_adapters_are_refused_with_reason(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    folder, _ = tiny_model_dir
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
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((wrong / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="corrupt"):
        registry.fetch(AdapterKey((str(corrupt),), "local"))


SLOT_PATTERNS = {  # each token's adapter (-1: base model)
    "mixed": [2, -1, 0, 0, 3, 1, -1, 0, 3, 1, 1, 1],  # uneven segments and base tokens: padded
    "shuffled": [1, 0, 3, 2],  # one token per adapter, out of order: a pure permutation
    "in_order": [0, 0, 1, 1, 2, 2, 3, 3],  # already grouped with equal counts: no reordering at all
}


@pytest.mark.parametrize("pattern", SLOT_PATTERNS)
@pytest.mark.parametrize("layout", ["side_by_side", "segments", None])
def test_both_lora_layouts_equal_per_token_reference(layout, pattern):
    """Each token gets exactly its own adapter's delta, whatever layout runs the batch."""
    from lorax_server.adapters.weights import LoraWeights
    from lorax_server.layers.lora import GROUPS, LoraBatch, stack_adapters

    torch.manual_seed(0)
    layers, d_in, outs = 2, 12, {"q_proj": 12, "k_proj": 4, "v_proj": 4, "o_proj": 12, "gate_proj": 20,
                                  "up_proj": 20, "down_proj": 12}
    ins = {"qkv": d_in, "o": 12, "gate_up": d_in, "down": 20}
    module_in = {m: ins[g] for g, ms in GROUPS.items() for m in ms}
    specs = [(4, ["q_proj", "v_proj"]), (8, list(outs)), (2, ["down_proj"]), (16, ["q_proj", "k_proj", "o_proj"])]
    adapters = [
        LoraWeights(r, {m: (torch.randn(layers, module_in[m], r), torch.randn(layers, r, outs[m])) for m in targets})
        for r, targets in specs
    ]
    groups = stack_adapters(adapters, outs, layers, ins, torch.float32, torch.device("cpu"))
    slots = torch.tensor(SLOT_PATTERNS[pattern])
    batch = LoraBatch(groups, slots, layout)
    assert (batch.segments.padded, batch.segments.identity) == {
        "mixed": (True, False), "shuffled": (False, False), "in_order": (False, True)}[pattern]
    for group, modules in GROUPS.items():
        x = torch.randn(len(slots), ins[group])
        y = torch.randn(len(slots), sum(outs[m] for m in modules))
        expected = y.clone()
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            parts = [x[t] @ adapters[slot].modules[m][0][1] @ adapters[slot].modules[m][1][1]
                     if m in adapters[slot].modules else torch.zeros(outs[m]) for m in modules]
            expected[t] += torch.cat(parts)
        assert torch.allclose(batch.apply(group, 1, x, y), expected, atol=1e-4), (group, layout)
    if layout is None and pattern == "mixed":  # many adapters, a token or two each: segments are cheaper
        assert batch.layouts["qkv"] == "segments"
