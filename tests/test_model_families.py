"""Qwen3, Granite, Gemma, Gemma 2, Gemma 3 (text), Phi-3, Mixtral, Qwen2/3-MoE, StableLM, Falcon, Bloom, MPT and GPT-Neo
on the shared decoder equal transformers (+ peft): logits of a mixed prefill and a decode step over the paged cache, greedy
tokens of staggered batches, and two adapters in one batch. Rotary scaling types equal transformers' own init
functions; ALiBi slopes (Bloom's and MPT's) equal transformers'."""
from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.kv_cache import BLOCK_SIZE
from lorax_server.layers.alibi import alibi_slopes, mpt_alibi_slopes
from lorax_server.layers.attention import build_metadata
from lorax_server.layers.rotary import Rotary, inverse_frequencies, rope_parameters
from lorax_server.models import load_model, read_config
from lorax_server.shard import build_service
from tests.test_shard_exactness import PROMPTS, make_request, run_staggered
from tests.tiny_models import make_adapter, make_model, make_tokenizer

SLIDING_FULL = ["sliding_attention", "full_attention"]
UNSET = object()  # a shared setting the family's config class has no field for (Falcon's head_dim is a property)
NOT_LLAMA = dict(head_dim=UNSET, num_key_value_heads=UNSET, intermediate_size=UNSET)
# family -> (config class, model class, settings that make its differences matter in a tiny model)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.15, logits_scaling=2.5)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_act="gelu")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=4, query_pre_attn_scalar=24, layer_types=SLIDING_FULL, final_logit_softcapping=2.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    # longrope past the original length (factor 8: an attention factor too), short factors at these lengths
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=64, sliding_window=6,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
                         "long_factor": [4.0 + i for i in range(8)]})),
    "phi4-mini": ("Phi3Config", "Phi3ForCausalLM", dict(  # Phi-3 layout, rotary over 3/4 of each head
        partial_rotary_factor=0.75, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0 + i / 4 for i in range(6)],
                         "long_factor": [4.0 + i for i in range(6)]})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # experts in layer 0 only (the other keeps a dense MLP); Qwen3 renormalises the top k, Qwen2 adds a shared expert
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        mlp_only_layers=[1])),
    # parallel residual from one norm, q/k biases, a LayerNorm per q/k head, rotary over half of each head
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(
        partial_rotary_factor=0.5, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True)),
    "stablelm-sequential": ("StableLmConfig", "StableLmForCausalLM", {}),  # a quarter of each head rotated
    # new architecture: each KV head's block [q, q, k, v] in query_key_value, two input norms, biases everywhere
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        NOT_LLAMA, new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=128, bias=True)),
    "falcon-7b": ("FalconConfig", "FalconForCausalLM", dict(  # multi-query [q..., k, v], one input norm
        NOT_LLAMA, multi_query=True, ffn_hidden_size=128)),
    "falcon-rw": ("FalconConfig", "FalconForCausalLM", dict(  # ALiBi, per-head [q, k, v], one layer after the other
        NOT_LLAMA, alibi=True, multi_query=False, parallel_attn=False, bias=True, ffn_hidden_size=128)),
    # ALiBi with 6 heads: slopes of 4 heads' ratio, then 2 of the 8-head sequence between them
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(NOT_LLAMA, hidden_size=96, num_attention_heads=6)),
    # ALiBi over 6 heads (between powers of two), q/k/v clamped, its own softmax scale, tied embeddings
    "mpt": ("MptConfig", "MptForCausalLM", dict(
        NOT_LLAMA, hidden_size=96, num_attention_heads=6, max_position_embeddings=UNSET, max_seq_len=512,
        tie_word_embeddings=True, attn_config=dict(clip_qkv=1.5, softmax_scale=0.3))),
    # learned positions, a global layer then a local one whose window (4) the prompts outgrow, unscaled scores
    "gpt-neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
        NOT_LLAMA, attention_types=[[["global", "local"], 1]], window_size=4, tie_word_embeddings=True)),
    # the Llama family's per-layer windows: Qwen2 slides only from layer max_window_layers on
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}


def make_family_model(family: str, folder, **overrides):
    """A tiny random model of `family` with its tokenizer in `folder`; norms randomised too, so that (1 + w) and w
    differ, and matrices scaled up so that greedy choices are decisive."""
    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    tok = make_tokenizer(folder)
    settings = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.unk_token_id,
    )
    settings.update(extra, **overrides)
    config = getattr(transformers, config_name)(**{k: v for k, v in settings.items() if v is not UNSET})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model, tok


def forward(model, ids: list[list[int]], kv_lens: list[int], cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Our logits for every new token of requests that add `ids` and then hold `kv_lens` tokens."""
    query_lens = torch.tensor([len(i) for i in ids])
    meta = build_metadata(query_lens, torch.tensor(kv_lens), tables, BLOCK_SIZE, model.cfg.sliding_window,
                          int(query_lens.max()), max(kv_lens))
    flat = torch.tensor([t for i in ids for t in i])
    return model.forward(flat, meta, cache, torch.arange(len(flat)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_in_prefill_and_decode(family, tmp_path):
    reference, tok = make_family_model(family, tmp_path)
    model = load_model(tmp_path, None, torch.device("cpu"), Parallel())
    prompts = [tok(p)["input_ids"] for p in ("The quick brown fox jumps over", "Hello world")]
    cache = torch.zeros(model.cfg.num_layers, 2, model.num_kv_heads, 4 * BLOCK_SIZE, model.cfg.head_dim)
    tables = torch.tensor([[0, 1], [2, 3]])

    ours = forward(model, prompts, [len(p) for p in prompts], cache, tables).split([len(p) for p in prompts])
    with torch.no_grad():
        expected = [reference(torch.tensor([p])).logits[0] for p in prompts]
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    nxt = [[int(e[-1].argmax())] for e in expected]
    ours = forward(model, nxt, [len(p) + 1 for p in prompts], cache, tables)
    with torch.no_grad():
        expected = torch.stack([reference(torch.tensor([p + n])).logits[0, -1] for p, n in zip(prompts, nxt)])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "granite", "gemma2", "gemma3", "phi3", "mixtral", "qwen2-moe"])
def test_greedy_tokens_match_transformers_with_mid_decode_joins(family, tmp_path):
    reference, tok = make_family_model(family, tmp_path)
    generator = build_service(str(tmp_path), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    generator.allocate_cache(2048)
    max_new = [12, 6, 9, 10]
    requests = [make_request(tok, i, p, n) for i, (p, n) in enumerate(zip(PROMPTS, max_new))]
    ours = run_staggered(generator, requests)
    for i, (prompt, n) in enumerate(zip(PROMPTS, max_new)):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        expected = reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
        assert ours[i] == expected.tolist(), f"{family} request {i}"


ADAPTER_TARGETS = {  # family -> the two adapters' targets (default: the separate projections')
    "phi3": (["qkv_proj"], ["gate_up_proj", "o_proj", "down_proj"]),
    "falcon": (["query_key_value"], ["dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "bloom": (["query_key_value"], ["dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "mpt": (["Wqkv"], ["out_proj", "up_proj", "down_proj"]),
    "gpt-neo": (["q_proj", "k_proj", "v_proj", "out_proj"], ["q_proj", "c_fc", "c_proj"]),
    "mixtral": (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "o_proj"]),  # attention only
    "qwen3-moe": (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "o_proj"]),
}


@pytest.mark.parametrize("family", ["qwen3", "granite", "gemma", "gemma2", "gemma3", "phi3", "mixtral", "qwen3-moe",
                                    "stablelm", "falcon", "bloom", "mpt", "gpt-neo"])
def test_two_adapters_and_the_base_in_one_batch_match_peft(family, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    reference, tok = make_family_model(family, tmp_path / "base")
    first, second = ADAPTER_TARGETS.get(
        family, (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "gate_proj", "up_proj", "down_proj"])
    )
    adapters = [
        make_adapter(reference, tmp_path / "a1", 1, 8, 16, first),
        make_adapter(reference, tmp_path / "a2", 2, 4, 8, second),
    ]
    generator = build_service(str(tmp_path / "base"), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    generator.allocate_cache(2048)
    for index, folder in enumerate(adapters, start=1):
        generator.adapters.load(AdapterKey((str(folder),), "local"), index)
    requests = []
    for j in range(6):  # request j asks prompt j // 3 of adapter j % 3 (0: the base model)
        requests.append(make_request(tok, j, PROMPTS[j // 3], 8))
        requests[-1].adapter_index = j % 3
    ours = run_staggered(generator, requests, join_after=2)

    peft = PeftModel.from_pretrained(reference, adapters[0], adapter_name="a1")
    peft.load_adapter(adapters[1], adapter_name="a2")
    for j, request in enumerate(requests):
        ids = tok(PROMPTS[j // 3], return_tensors="pt")["input_ids"]
        generate = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        if j % 3:
            peft.set_adapter(f"a{j % 3}")
            expected = peft.generate(input_ids=ids, **generate)
        else:
            with peft.disable_adapter():
                expected = peft.generate(input_ids=ids, **generate)
        assert ours[j] == expected[0, ids.shape[1]:].tolist(), f"{family} request {j} (adapter {j % 3})"
    assert len({tuple(ours[j]) for j in range(3)}) == 3, "each adapter must change the output of the same prompt"


def test_family_configs_read_from_hub_style_config_json():
    """Checkpoints saved before transformers 5 carry no layer_types / nested rope_parameters: the family rules apply."""
    base = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                head_dim=16, max_position_embeddings=512)
    gemma = read_config({**base, "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu"})
    assert (gemma.activation, gemma.sliding_window, gemma.sandwich_norms) == ("gelu_pytorch_tanh", None, False)
    gemma2 = read_config({**base, "architectures": ["Gemma2ForCausalLM"], "sliding_window": 8})
    assert gemma2.layer_windows == (8, None) * 3 and gemma2.sliding_window is None
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.tie_word_embeddings) == (50.0, 30.0, True)
    gemma3 = read_config({**base, "architectures": ["Gemma3ForCausalLM"], "sliding_window": 8, "sliding_window_pattern": 3,
                          "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert gemma3.layer_windows == (8, 8, None) * 2
    assert gemma3.layer_rope == ("sliding_attention", "sliding_attention", "full_attention") * 2
    full = gemma3.rope["full_attention"]
    assert (full["rope_type"], full["factor"], full["rope_theta"]) == ("linear", 8.0, 1e6)
    assert (gemma3.rope["sliding_attention"]["rope_type"], gemma3.rope["sliding_attention"]["rope_theta"]) == ("default", 1e4)
    qwen2 = read_config({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 8,
                         "max_window_layers": 4})
    assert qwen2.layer_windows == (None,) * 4 + (8, 8)
    mistral = read_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 8})
    assert mistral.sliding_window == 8  # one window for every layer: the batch metadata applies it
    phi3 = read_config({**base, "architectures": ["Phi3ForCausalLM"], "sliding_window": 8, "original_max_position_embeddings": 128,
                        "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}})
    assert (phi3.rope["all"]["rope_type"], phi3.rope["all"]["original_max_position_embeddings"]) == ("longrope", 128)
    assert phi3.names.qkv == ("qkv_proj",) and phi3.sliding_window == 8
    yarn = {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}  # transformers reads it as longrope
    assert read_config({**base, "architectures": ["Phi3ForCausalLM"], "rope_scaling": yarn}).rope["all"]["rope_type"] == "longrope"
    experts = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[5])
    qwen3_moe = read_config({**base, **experts, "architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": True,
                             "sliding_window": 8, "use_sliding_window": False})
    assert (qwen3_moe.moe.layers, qwen3_moe.moe.num_experts, qwen3_moe.moe.normalize_top_k) == ((1, 3), 8, True)
    assert qwen3_moe.qk_norm and qwen3_moe.sliding_window is None and qwen3_moe.moe.shared is None
    qwen2_moe = read_config({**base, **experts, "architectures": ["Qwen2MoeForCausalLM"], "shared_expert_intermediate_size": 64,
                             "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4})
    assert qwen2_moe.layer_windows == (8, None, 8, None, None, None) and qwen2_moe.qkv_bias
    assert qwen2_moe.moe.shared.intermediate_size == 64 and not qwen2_moe.moe.normalize_top_k
    granite = read_config({**base, "architectures": ["GraniteForCausalLM"], "attention_multiplier": 0.5})
    assert granite.attention_scale == 0.5 and granite.sliding_window is None
    with pytest.raises(ValueError, match="unsupported activation 'relu2'"):
        read_config({**base, "architectures": ["LlamaForCausalLM"], "hidden_act": "relu2"})
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM.*Gemma3ForCausalLM"):
        read_config({**base, "architectures": ["GPT2LMHeadModel"]})


def test_stablelm_and_falcon_configs_read_from_hub_style_config_json():
    """StableLM configs without `partial_rotary_factor` rotate a quarter of each head; Falcon's fused-projection
    layout, norms and KV heads follow new_decoder_architecture / multi_query / parallel_attn; the combinations
    transformers cannot run are refused with the reason."""
    stablelm = read_config({"architectures": ["StableLmForCausalLM"], "vocab_size": 32, "hidden_size": 64,
                            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "rope_theta": 1e4, "layer_norm_eps": 1e-5})
    assert stablelm.rope["all"]["partial_rotary_factor"] == 0.25 and stablelm.norm == "layer"
    assert not (stablelm.qkv_bias or stablelm.qk_norm or stablelm.parallel_residual)
    base = {"architectures": ["FalconForCausalLM"], "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    falcon_40b = read_config({**base, "new_decoder_architecture": True, "num_kv_heads": 2})
    assert (falcon_40b.num_kv_heads, falcon_40b.qkv_grouped, falcon_40b.intermediate_size) == (2, True, 256)
    assert (falcon_40b.names.input_norm, falcon_40b.names.mlp_norm, falcon_40b.tie_word_embeddings) == (
        "ln_attn", "ln_mlp", True)
    one_norm = read_config({**base, "new_decoder_architecture": True, "num_ln_in_parallel_attn": 1})
    assert (one_norm.names.input_norm, one_norm.names.mlp_norm, one_norm.parallel_residual) == (
        "input_layernorm", None, True)
    falcon_7b = read_config(base)  # multi_query and parallel_attn are Falcon's defaults
    assert (falcon_7b.num_kv_heads, falcon_7b.qkv_grouped, falcon_7b.names.mlp_norm) == (1, False, None)
    sequential = read_config({**base, "multi_query": False, "parallel_attn": False, "bias": True})
    assert (sequential.num_kv_heads, sequential.qkv_grouped, sequential.parallel_residual) == (4, True, False)
    assert sequential.names.mlp_norm == "post_attention_layernorm" and sequential.mlp_bias
    with pytest.raises(ValueError, match="new decoder architecture with parallel_attn=false"):
        read_config({**base, "new_decoder_architecture": True, "parallel_attn": False})


def test_adapters_name_fused_modules_only_on_the_family_that_fuses_them(tmp_path, monkeypatch):
    """Phi-3 adapters target qkv_proj / gate_up_proj (their B in the fused output layout); a Llama adapter's q_proj
    means nothing to Phi-3, and a Phi-3 adapter's fused names nothing to Llama: refused with the supported names."""
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    phi3, _ = make_family_model("phi3", tmp_path / "phi3")
    fused = make_adapter(phi3, tmp_path / "fused", 1, 4, 8, ["qkv_proj", "gate_up_proj"])
    separate = make_adapter(make_model("llama", tmp_path / "llama"), tmp_path / "separate", 1, 4, 8, ["q_proj", "gate_proj"])
    registry = {
        name: build_service(str(tmp_path / name), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator.adapters
        for name in ("phi3", "llama")
    }
    weights = registry["phi3"].fetch(AdapterKey((str(fused),), "local"))
    assert {m: b.shape[-1] for m, (_, b) in weights.modules.items()} == {"qkv_proj": 64 + 2 * 32, "gate_up_proj": 2 * 128}
    with pytest.raises(AdapterError, match=r"targets gate_proj, q_proj, which this server cannot apply \(supported: "
                                           r"qkv_proj, o_proj, gate_up_proj, down_proj\)"):
        registry["phi3"].fetch(AdapterKey((str(separate),), "local"))
    with pytest.raises(AdapterError, match=r"targets gate_up_proj, qkv_proj, which this server cannot apply \(supported: q_proj"):
        registry["llama"].fetch(AdapterKey((str(fused),), "local"))


def test_mixtral_batch_routed_to_every_expert_matches_transformers(tmp_path, monkeypatch):
    """Every layer's experts all run in one batch, each over several tokens, and the logits equal transformers'."""
    from lorax_server.layers.moe import SparseMoe

    reference, tok = make_family_model("mixtral", tmp_path)
    model = load_model(tmp_path, None, torch.device("cpu"), Parallel())
    routed = []
    route = SparseMoe.route
    monkeypatch.setattr(SparseMoe, "route", lambda self, x: routed.append(route(self, x)) or routed[-1])
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    cache = torch.zeros(model.cfg.num_layers, 2, model.num_kv_heads, 6 * BLOCK_SIZE, model.cfg.head_dim)
    ours = forward(model, prompts, [len(p) for p in prompts], cache, torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert len(routed) == model.cfg.num_layers
    for experts, _ in routed:
        assert torch.bincount(experts.flatten(), minlength=4).min() >= 2, experts
    with torch.no_grad():
        expected = [reference(torch.tensor([p])).logits[0] for p in prompts]
    torch.testing.assert_close(ours, torch.cat(expected), atol=1e-4, rtol=1e-4)


def test_mixtral_adapters_on_experts_are_refused_with_the_reason(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    reference, _ = make_family_model("mixtral", tmp_path / "base")
    registry = build_service(str(tmp_path / "base"), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator.adapters
    folder = make_adapter(reference, tmp_path / "a", 1, 4, 8, ["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    for name, change, reason in [
        ("params", {"target_parameters": ["mlp.experts.gate_up_proj"]}, r"targets parameters .* \(such as expert weights\)"),
        ("legacy", {"target_modules": ["q_proj", "w1", "w2"]}, r"targets w1, w2, which this server cannot apply "
                                                                r"\(supported: q_proj, k_proj, v_proj, o_proj\)"),
    ]:
        edited = tmp_path / name
        edited.mkdir()
        (edited / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
        (edited / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=reason):
            registry.fetch(AdapterKey((str(edited),), "local"))
    assert set(registry.fetch(AdapterKey((str(folder),), "local")).modules) == {"q_proj"}


ROPES = [  # (rope parameters, sequence lengths to compare at)
    ({"rope_type": "linear", "factor": 4.0}, [None]),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, [None]),
    ({"rope_type": "dynamic", "factor": 4.0}, [None, 100, 2000]),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, [None]),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
      "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}, [None]),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "attention_factor": 1.3}, [None]),
    ({"rope_type": "longrope", "original_max_position_embeddings": 128,
      "short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}, [None, 100, 200]),
]


def _hf_config(params: dict):
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=512,
                                    rope_parameters={"rope_theta": 5000.0, **params})


@pytest.mark.parametrize("params,lengths", ROPES, ids=[f"{p['rope_type']}-{i}" for i, (p, _) in enumerate(ROPES)])
def test_rope_scaling_equals_transformers_init_functions(params, lengths):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_config(params)
    ours = rope_parameters(config.to_dict())
    for seq_len in lengths:
        want, want_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)
        got, got_factor = inverse_frequencies(ours, 16, seq_len)
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
        assert got_factor == pytest.approx(want_factor, rel=1e-12), seq_len
    # the layout of checkpoints saved before transformers 5 reads the same
    legacy = {"rope_theta": 5000.0, "max_position_embeddings": 512,
              "rope_scaling": {("type" if k == "rope_type" else k): v for k, v in params.items()}}
    assert rope_parameters(legacy) == ours


@pytest.mark.parametrize("params", [ROPES[3][0], ROPES[-1][0]], ids=["yarn", "longrope"])
def test_rotary_tables_equal_transformers_rotary_embedding(params):
    """cos/sin with the attention factor folded in; longrope's long factors from the original length on, as in a
    decode step there."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _hf_config(params)
    rotary = Rotary(rope_parameters(config.to_dict()), 16, 512, torch.device("cpu"), torch.float32)
    embedding = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    short = torch.arange(128)[None]
    cos, sin = embedding(x, short)
    torch.testing.assert_close(rotary.cos[:128], cos[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotary.sin[:128, 8:], sin[0, :, 8:], rtol=1e-5, atol=1e-5)
    for position in (128, 300, 511):
        cos, sin = embedding(x, torch.tensor([[position]]))
        torch.testing.assert_close(rotary.cos[position], cos[0, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rotary.sin[position, 8:], sin[0, 0, 8:], rtol=1e-5, atol=1e-5)


TWO_SHARD_TARGETS = {
    "qwen3": ["q_proj", "k_proj", "v_proj", "gate_proj"],
    "gemma2": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj"],
    "mixtral": ["q_proj", "v_proj", "o_proj"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(TWO_SHARD_TARGETS))
def test_two_shards_match_transformers_and_peft(family, tmp_path):
    """Heads, KV heads, the MLP (Phi-3's fused projections part by part, each Mixtral expert) and the vocabulary split
    over two gloo ranks through the launcher; Gemma 2's soft-caps and windows per rank."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.e2e import Launcher
    from tests.test_e2e_serving import expected_tokens, generate

    reference, _ = make_family_model(family, tmp_path / "base")
    adapter = make_adapter(reference, tmp_path / "adapter", 3, 8, 16, TWO_SHARD_TARGETS[family])
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--num-shard", "2", "--max-input-length", "32",
                        "--max-total-tokens", "64").wait_ready()
    try:
        jobs = [("Hello world", None), ("The quick brown fox", adapter), ("What is the capital", None)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(
                lambda job: generate(launcher.url, job[0], **({"adapter_id": str(job[1]), "adapter_source": "local"}
                                                              if job[1] else {})), jobs))
        for (prompt, a), response in zip(jobs, responses):
            assert response.status_code == 200, response.text
            tokens = [t["id"] for t in response.json()["details"]["tokens"]]
            assert tokens == expected_tokens(tmp_path / "base", a, prompt, 8), prompt
    finally:
        assert launcher.stop() == 0, launcher.output()


def test_partial_rotary_factor_is_read_from_either_config_layout():
    """transformers 5 nests it in rope_parameters; Phi-4-mini's hub config.json has it at the top level."""
    nested = rope_parameters({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})
    top_level = rope_parameters({"rope_theta": 1e4, "partial_rotary_factor": 0.75})
    assert (nested["partial_rotary_factor"], top_level["partial_rotary_factor"]) == (0.5, 0.75)


def test_alibi_slopes_equal_transformers():
    """Powers of two and the counts between them (the extra heads take the odd powers of the next sequence)."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 71, 112):
        want = _get_alibi_slopes(heads, "cpu")
        torch.testing.assert_close(torch.tensor(alibi_slopes(heads)), want, rtol=1e-6, atol=0)


def test_alibi_and_bloom_configs_read_from_hub_style_config_json():
    """Bloom names its sizes n_head / n_layer (n_embed in old checkpoints); Falcon-RW's ALiBi is added before the
    1/sqrt(head_dim) scale, its slopes rounded to bfloat16 as transformers rounds them."""
    base = {"architectures": ["BloomForCausalLM"], "vocab_size": 32, "n_layer": 2, "n_head": 4}
    bloom = read_config({**base, "n_embed": 64})
    assert (bloom.hidden_size, bloom.intermediate_size, bloom.num_layers, bloom.head_dim) == (64, 256, 2, 16)
    assert bloom.alibi_slopes == tuple(alibi_slopes(4)) and bloom.qkv_grouped and bloom.num_kv_heads == 4
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm=true is not supported"):
        read_config({**base, "hidden_size": 64, "apply_residual_connection_post_layernorm": True})
    falcon_rw = read_config({"architectures": ["FalconForCausalLM"], "vocab_size": 32, "hidden_size": 96,
                             "num_hidden_layers": 2, "num_attention_heads": 12, "alibi": True, "multi_query": False})
    want = torch.tensor(alibi_slopes(12)).bfloat16().float() / 8**0.5
    torch.testing.assert_close(torch.tensor(falcon_rw.alibi_slopes), want, rtol=1e-6, atol=0)


def test_alibi_prefill_takes_the_masked_path_where_flash_prefill_would_run(tmp_path, monkeypatch):
    """On CUDA a prompt batch carries no dense mask, for flash prefill; ALiBi heads (which flash prefill cannot bias)
    must build it and attend through the masked path, and their logits still equal transformers'."""
    from lorax_server.layers import flash_prefill

    monkeypatch.setattr(flash_prefill, "usable", lambda device: True)
    monkeypatch.setattr(flash_prefill, "supports", lambda dtype, head_dim: True)
    monkeypatch.setattr(flash_prefill, "attend", lambda *args: pytest.fail("ALiBi heads went through flash prefill"))
    reference, tok = make_family_model("bloom", tmp_path)
    model = load_model(tmp_path, None, torch.device("cpu"), Parallel())
    prompts = [tok(p)["input_ids"] for p in ("The quick brown fox jumps over", "Hello world")]
    cache = torch.zeros(model.cfg.num_layers, 2, model.num_kv_heads, 4 * BLOCK_SIZE, model.cfg.head_dim)
    ours = forward(model, prompts, [len(p) for p in prompts], cache, torch.tensor([[0, 1], [2, 3]]))
    with torch.no_grad():
        expected = torch.cat([reference(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_bloom_checkpoint_saved_from_the_bare_model_loads(tmp_path):
    """Bloom's hub checkpoints were saved from BloomModel: their names lack the `transformer.` prefix."""
    import shutil

    from safetensors.torch import load_file, save_file

    make_family_model("bloom", tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "bare")
    tensors = load_file(tmp_path / "base" / "model.safetensors")
    assert any(name.startswith("transformer.") for name in tensors)
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items()},
              tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    models = [load_model(tmp_path / name, None, torch.device("cpu"), Parallel()) for name in ("base", "bare")]
    ids = [[5, 17, 42, 7]]
    logits = []
    for model in models:
        cache = torch.zeros(model.cfg.num_layers, 2, model.num_kv_heads, BLOCK_SIZE, model.cfg.head_dim)
        logits.append(forward(model, ids, [4], cache, torch.tensor([[0]])))
    assert torch.equal(logits[0], logits[1])


def test_mpt_alibi_slopes_equal_transformers():
    """MPT's slopes for head counts that are powers of two and between them, with alibi_bias_max 8 (then they are
    Bloom's) and 16."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for heads in (1, 2, 3, 4, 6, 8, 12, 24, 32, 56):
        for bias_max in (8, 16):
            want = -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0]  # the first of two keys is 1 behind
            torch.testing.assert_close(torch.tensor(mpt_alibi_slopes(heads, bias_max)), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(mpt_alibi_slopes(24)), torch.tensor(alibi_slopes(24)), rtol=1e-6, atol=0)


MPT_7B = {  # mosaicml/mpt-7b's config.json, as saved by its own code
    "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
    "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "learned_pos_emb": True,
    "norm_type": "low_precision_layernorm", "logit_scale": None, "emb_pdrop": 0, "resid_pdrop": 0,
    "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                    "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                    "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
}


def test_mpt_config_reads_from_hub_style_config_json():
    """MPT's own config names (d_model, n_heads, expansion_ratio, max_seq_len, attn_config); the settings MPT's code
    has and transformers does not run are refused at start-up, each named."""
    mpt = read_config(MPT_7B)
    assert (mpt.hidden_size, mpt.num_heads, mpt.num_kv_heads, mpt.num_layers, mpt.intermediate_size) == (
        4096, 32, 32, 32, 16384)
    assert (mpt.max_position_embeddings, mpt.tie_word_embeddings, mpt.norm, mpt.gated_mlp) == (
        2048, True, "layer", False)
    assert (mpt.qkv_clip, mpt.attention_scale, mpt.names.qkv) == (None, None, ("Wqkv",))
    assert mpt.alibi_slopes == tuple(mpt_alibi_slopes(32))
    attn = MPT_7B["attn_config"]
    custom = read_config({**MPT_7B, "n_heads": 24, "expansion_ratio": 2,
                          "attn_config": {**attn, "clip_qkv": 6, "softmax_scale": 0.1, "alibi_bias_max": 16}})
    assert (custom.qkv_clip, custom.attention_scale, custom.intermediate_size) == (6, 0.1, 8192)
    assert custom.alibi_slopes == tuple(mpt_alibi_slopes(24, 16))
    refused = {
        "attn_config.alibi=false": {"attn_config": {**attn, "alibi": False}},
        "attn_config.attn_type=grouped_query_attention": {"attn_config": {**attn, "attn_type": "grouped_query_attention",
                                                                          "kv_n_heads": 8}},
        "attn_config.qk_ln=true": {"attn_config": {**attn, "qk_ln": True}},
        "attn_config.prefix_lm=true": {"attn_config": {**attn, "prefix_lm": True}},
        "no_bias=false": {"no_bias": False},
        "logit_scale=inv_sqrt_d_model": {"logit_scale": "inv_sqrt_d_model"},
        "norm_type=rmsnorm": {"norm_type": "rmsnorm"},
        "ffn_config.ffn_type=mptglu": {"ffn_config": {"ffn_type": "mptglu"}},
    }
    for reason, change in refused.items():
        with pytest.raises(ValueError, match=f"MPT with {reason}.* is not supported"):
            read_config({**MPT_7B, **change})


def test_gpt_neo_config_reads_from_hub_style_config_json():
    """EleutherAI/gpt-neo-125M's config.json: global and local layers in turn, the MLP four times the width where
    intermediate_size is null; attention_types that do not cover the layers are refused."""
    neo_125m = {
        "architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo", "activation_function": "gelu_new",
        "attention_types": [[["global", "local"], 6]], "attention_layers": ["global", "local"] * 6, "hidden_size": 768,
        "intermediate_size": None, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048, "num_heads": 12,
        "num_layers": 12, "vocab_size": 50257, "window_size": 256,
    }
    neo = read_config(neo_125m)
    assert (neo.hidden_size, neo.intermediate_size, neo.num_heads, neo.num_kv_heads, neo.head_dim) == (
        768, 3072, 12, 12, 64)
    assert neo.layer_windows == (None, 256) * 6 and neo.sliding_window is None
    assert (neo.attention_scale, neo.rotary, neo.names.positions, neo.tie_word_embeddings) == (1.0, False, "wpe", True)
    assert (neo.activation, neo.o_bias, neo.mlp_bias, neo.qkv_bias) == ("gelu_new", True, True, False)
    with pytest.raises(ValueError, match="attention_types .* do not give global/local attention for each of the 12"):
        read_config({**neo_125m, "attention_types": [[["global", "local"], 5]]})
