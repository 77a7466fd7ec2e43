"""--quantize: every format reads and dequantizes as its reference does, the CPU kernel multiplies as F.linear on the
dequantized weight, tensor parallelism slices groups correctly, and a quantized base serves mixed-adapter batches
that equal transformers + peft on the dequantized weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.layers.quantized import QuantizedLinear, QuantizedRows
from lorax_server.pb import generate_pb2 as pb
from lorax_server.quantization import bitsandbytes as ours_bnb
from lorax_server.quantization.grouped import GroupedWeight
from lorax_server.quantization.schemes import choose_scheme
from lorax_server.shard import build_service
from lorax_server.weights import EMBEDDINGS_ENV, Weights, int8_embeddings
from tests.test_shard_exactness import PROMPTS, make_request
from tests.tiny_models import make_adapter, make_model

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's GEMM packing: nibble i of a word holds column ORDER[i]
LOGPROB_TOLERANCE = 2e-3  # float32 kernel vs transformers' float32 matmuls on the same dequantized weights


# --- bitsandbytes: our quantization and reading against the library's own functions ---------------------------

def test_codebooks_are_bitsandbytes():
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(ours_bnb.codebook(quant_type), bnb.functional.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_quantization_equals_bitsandbytes(quant_type):
    torch.manual_seed(0)
    weight = torch.randn(48, 192) * torch.rand(48, 1)  # rows of different ranges
    weight[3, :64] = 0  # an all-zero block
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    grouped = ours_bnb.quantize_4bit(weight, quant_type)
    flat = packed.reshape(-1)
    theirs = torch.stack([flat >> 4, flat & 15], dim=1).reshape(48, 192)
    assert torch.equal(grouped.codes, theirs)
    assert torch.equal(grouped.scale.reshape(-1), state.absmax)
    assert torch.equal(grouped.dequantize(), bnb.functional.dequantize_4bit(packed, state))


def test_int8_quantization_equals_bitsandbytes():
    torch.manual_seed(1)
    weight = torch.randn(40, 96) * 0.1
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.clone())
    grouped = ours_bnb.quantize_int8(weight)
    assert torch.equal((grouped.codes.to(torch.int16) - 128).to(torch.int8), cb)
    torch.testing.assert_close(grouped.scale.reshape(-1) * 127, scb, rtol=1e-6, atol=0)
    # bitsandbytes multiplies by the row absmax, then by 1/127; we fold 1/127 into the scale: an ulp apart
    torch.testing.assert_close(grouped.dequantize(), bnb.functional.int8_vectorwise_dequant(cb, scb), rtol=1e-6, atol=0)


# --- GPTQ and AWQ: a packer written from the formats' descriptions, independent of the reader ------------------

def rtn_quantize(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int):
    """Asymmetric round-to-nearest per group: (codes [in, out], scales [groups, out] fp16, zeros [groups, out])."""
    maxq = 2**bits - 1
    w = weight.t()
    codes = torch.zeros_like(w, dtype=torch.int64)
    scales = torch.zeros(groups, w.shape[1], dtype=torch.float16)
    zeros = torch.zeros(groups, w.shape[1], dtype=torch.int64)
    for g in range(groups):
        block = w[g_idx == g]
        lo, hi = block.min(0).values.clamp(max=0), block.max(0).values.clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-5).half()
        zero = torch.round(-lo / scale.float()).clamp(1, maxq)  # >= 1: GPTQ v1 stores zero - 1
        codes[g_idx == g] = torch.clamp(torch.round(block / scale.float()) + zero, 0, maxq).long()
        scales[g], zeros[g] = scale, zero.long()
    return codes, scales, zeros


def pack_words(values: np.ndarray, bits: int, axis: int, order: list[int] | None = None) -> torch.Tensor:
    """Pack consecutive values along `axis` into uint32 words, value j of a word at bits j * bits (after `order`)."""
    per_word = 32 // bits
    values = np.moveaxis(values.astype(np.uint32), axis, 0)
    words = np.zeros((values.shape[0] // per_word,) + values.shape[1:], dtype=np.uint32)
    for j in range(per_word):
        source = order[j] if order else j
        words |= values[source::per_word] << np.uint32(bits * j)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words, 0, axis)).view(np.int32))


def gptq_tensors(weight: torch.Tensor, bits: int, group_size: int, act_order: bool, v2: bool = False, seed: int = 0):
    """GPTQ checkpoint tensors for `weight` and the float weight they stand for."""
    in_features = weight.shape[1]
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))]
    groups = -(-in_features // group_size)
    codes, scales, zeros = rtn_quantize(weight, bits, g_idx, groups)
    dequantized = (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).t()
    tensors = {
        "qweight": pack_words(codes.numpy(), bits, axis=0),
        "qzeros": pack_words((zeros - (0 if v2 else 1)).numpy(), bits, axis=1),
        "scales": scales, "g_idx": g_idx.to(torch.int32),
    }
    return tensors, dequantized


def awq_tensors(weight: torch.Tensor, group_size: int):
    """AWQ GEMM checkpoint tensors for `weight` and the float weight they stand for."""
    in_features = weight.shape[1]
    g_idx = torch.arange(in_features) // group_size
    codes, scales, zeros = rtn_quantize(weight, 4, g_idx, in_features // group_size)
    dequantized = (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).t()
    tensors = {
        "qweight": pack_words(codes.numpy(), 4, axis=1, order=AWQ_PACK_ORDER),
        "qzeros": pack_words(zeros.numpy(), 4, axis=1, order=AWQ_PACK_ORDER), "scales": scales,
    }
    return tensors, dequantized


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dequantizes_exactly(bits, group_size, act_order):
    from lorax_server.quantization.gptq import read_gptq

    torch.manual_seed(group_size + bits)
    weight = torch.randn(48, 256)
    tensors, expected = gptq_tensors(weight, bits, group_size, act_order)
    grouped = read_gptq(tensors, bits, group_size, zero_offset=1)
    assert torch.equal(grouped.dequantize(), expected)
    assert (grouped.dequantize() - weight).abs().max() < (0.3 if bits == 4 else 0.02)
    x = torch.randn(5, 256)
    torch.testing.assert_close(QuantizedLinear(grouped, CPU)(x), F.linear(x, expected), rtol=1e-4, atol=1e-4)


def test_gptq_v2_stores_zeros_without_offset():
    from lorax_server.quantization.gptq import read_gptq

    tensors, expected = gptq_tensors(torch.randn(32, 64), 4, 32, act_order=False, v2=True)
    assert torch.equal(read_gptq(tensors, 4, 32, zero_offset=0).dequantize(), expected)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_dequantizes_exactly(group_size):
    from lorax_server.quantization.gptq import read_awq

    torch.manual_seed(group_size)
    weight = torch.randn(40, 256)
    tensors, expected = awq_tensors(weight, group_size)
    grouped = read_awq(tensors, 4, group_size)
    assert torch.equal(grouped.dequantize(), expected)
    x = torch.randn(3, 256)
    torch.testing.assert_close(QuantizedLinear(grouped, CPU)(x), F.linear(x, expected), rtol=1e-4, atol=1e-4)


# --- the CPU kernel --------------------------------------------------------------------------------------------

def random_grouped(out_features: int, in_features: int, bits: int, group_size: int, zero: bool) -> GroupedWeight:
    torch.manual_seed(out_features * in_features + bits)
    groups = in_features // group_size
    return GroupedWeight(
        codes=torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.uint8),
        table=torch.randn(16) if bits == 4 else torch.arange(256, dtype=torch.float32),
        scale=torch.rand(out_features, groups), zero=torch.rand(out_features, groups) * 2**bits if zero else None,
        g_idx=torch.arange(in_features) // group_size, group_size=group_size, bits=bits,
    )


@pytest.mark.parametrize("bits,zero", [(4, False), (4, True), (8, True)])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 40])  # 1-4 take the fused path, more the buffered one
@pytest.mark.parametrize("out_features,in_features,group_size", [(40, 96, 32), (64, 512, 64), (17, 128, 128)])
def test_kernel_matches_f_linear(bits, zero, rows, out_features, in_features, group_size):
    grouped = random_grouped(out_features, in_features, bits, group_size, zero)
    linear = QuantizedLinear(grouped, CPU)
    x = torch.randn(rows, in_features)
    expected = F.linear(x, grouped.dequantize())
    scale = expected.abs().max().item() if rows else 1.0
    torch.testing.assert_close(linear(x), expected, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(linear.dequantize(), grouped.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 6])
def test_8bit_groups_of_odd_size(rows):
    grouped = random_grouped(24, 96, 8, 3, zero=True)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(QuantizedLinear(grouped, CPU)(x), F.linear(x, grouped.dequantize()), rtol=1e-4, atol=1e-4)


def test_strided_and_bfloat16_activations():
    """Activations sliced from a wider tensor, and non-float32 ones (the dequantize-and-F.linear path)."""
    grouped = random_grouped(32, 64, 4, 32, True)
    linear, weight = QuantizedLinear(grouped, CPU), grouped.dequantize()
    wide = torch.randn(6, 128)
    torch.testing.assert_close(linear(wide[:, ::2]), F.linear(wide[:, ::2], weight), rtol=1e-4, atol=1e-4)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x), F.linear(x, weight.bfloat16()))


@pytest.mark.gpu
def test_cuda_dequantizes_per_call():
    """Off the CPU the layer dequantizes in torch and multiplies with F.linear, in the activations' dtype."""
    grouped = random_grouped(40, 96, 4, 32, True)
    linear = QuantizedLinear(grouped, torch.device("cuda", 0))
    x = torch.randn(5, 96, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x), F.linear(x, grouped.dequantize().to("cuda", torch.bfloat16)))


def test_4bit_weights_take_under_a_third_of_float32():
    torch.manual_seed(0)
    weight = torch.randn(1536, 576)
    for grouped in (ours_bnb.quantize_4bit(weight, "nf4"), gptq_tensors_grouped(weight, 4, 128)):
        assert QuantizedLinear(grouped, CPU).nbytes <= 0.3 * weight.numel() * 4
    assert QuantizedLinear(ours_bnb.quantize_int8(weight), CPU).nbytes <= 0.26 * weight.numel() * 4


def gptq_tensors_grouped(weight: torch.Tensor, bits: int, group_size: int) -> GroupedWeight:
    from lorax_server.quantization.gptq import read_gptq

    return read_gptq(gptq_tensors(weight, bits, group_size, act_order=False)[0], bits, group_size, zero_offset=1)


# --- tensor parallelism --------------------------------------------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True])
def test_slices_per_rank_equal_slices_of_the_whole(act_order):
    from lorax_server.quantization.gptq import read_gptq

    torch.manual_seed(3)
    tensors, full = gptq_tensors(torch.randn(64, 128), 4, 32, act_order)
    grouped = read_gptq(tensors, 4, 32, zero_offset=1)
    x = torch.randn(5, 128)
    for world in (2, 4):
        part = 128 // world
        for rank in range(world):
            a, b = rank * part, (rank + 1) * part
            cols = QuantizedLinear(grouped.cols(a, b), CPU)
            torch.testing.assert_close(cols(x[:, a:b]), F.linear(x[:, a:b], full[:, a:b]), rtol=1e-4, atol=1e-4)
            rows = QuantizedLinear(grouped.rows(a // 2, b // 2), CPU)
            torch.testing.assert_close(rows(x), F.linear(x, full[a // 2 : b // 2]), rtol=1e-4, atol=1e-4)


def test_a_split_through_a_group_is_a_clear_error():
    grouped = ours_bnb.quantize_4bit(torch.randn(8, 128), "nf4")
    with pytest.raises(ValueError, match=r"input features \[32, 64\) of this shard cut a quantization group of 64"):
        grouped.cols(32, 64)
    int8 = ours_bnb.quantize_int8(torch.randn(8, 128))  # one row-wise group: any column split keeps it
    torch.testing.assert_close(int8.cols(32, 64).dequantize(), int8.dequantize()[:, 32:64])


# --- which scheme a shard loads with -------------------------------------------------------------------------

BNB_NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.mark.parametrize("quantize,config,message", [
    (None, {"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"quantized \(gptq\): use --quantize gptq"),
    (None, {"quantization_config": BNB_NF4}, "use --quantize bitsandbytes-nf4"),
    (None, {"quantization_config": {"quant_method": "fp8"}}, r"quantized \(fp8\): this server cannot load that method"),
    ("gptq", {}, "--quantize gptq loads pre-quantized gptq checkpoints, and this is float weights"),
    ("awq", {"quantization_config": {"quant_method": "gptq"}}, "and this is a gptq checkpoint"),
    ("bitsandbytes-fp4", {"quantization_config": BNB_NF4}, "does not match .* use --quantize bitsandbytes-nf4"),
    ("bitsandbytes", {"quantization_config": {"quant_method": "awq"}}, "use --quantize awq"),
    ("awq", {"quantization_config": {"quant_method": "awq", "version": "gemv"}}, "AWQ version 'gemv'"),
    ("gptq", {"quantization_config": {"quant_method": "gptq", "checkpoint_format": "marlin"}},
     "checkpoint_format 'marlin'"),
    ("int4", {}, "unknown --quantize value 'int4'"),
])
def test_unsuitable_pairings_are_refused_before_loading(quantize, config, message):
    with pytest.raises(ValueError, match=message):
        choose_scheme(quantize, config)


# --- whole models: quantized bases with mixed adapters equal transformers + peft --------------------------------

def save_quantized(base: Path, target: Path, quantization_config: dict, pack) -> dict[str, torch.Tensor]:
    """Copy a float model folder with every decoder linear replaced by `pack(weight)` -> (tensors, dequantized);
    returns the float state dict the checkpoint stands for."""
    shutil.copytree(base, target)
    state = load_file(str(base / "model.safetensors"))
    stored, dequantized = {}, dict(state)
    for name, tensor in state.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(LINEARS):
            tensors, dequantized[name] = pack(tensor)
            stored.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        else:
            stored[name] = tensor
    save_file(stored, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return dequantized


def bnb_reference(state: dict[str, torch.Tensor], quantize: str) -> dict[str, torch.Tensor]:
    """The float weights bitsandbytes' own quantize + dequantize make of a float checkpoint."""
    out = dict(state)
    for name, weight in state.items():
        if name.endswith(".weight") and name.removesuffix(".weight").endswith(LINEARS):
            if quantize == "bitsandbytes":
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.clone())
                out[name] = bnb.functional.int8_vectorwise_dequant(cb, scb)
            else:
                packed, qs = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type=quantize.split("-")[1])
                out[name] = bnb.functional.dequantize_4bit(packed, qs)
    return out


def transformers_prequantized(base: Path, target: Path, **settings) -> dict[str, torch.Tensor]:
    """A checkpoint transformers + bitsandbytes quantize and save with `settings`, and its weights dequantized by
    bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**settings, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    model.save_pretrained(target)
    for file in base.iterdir():  # the tokenizer
        if not (target / file.name).exists():
            shutil.copy(file, target)
    out = load_file(str(base / "model.safetensors"))
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out[f"{name}.weight"] = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return out


def checkpoint(kind: str, base: Path, tmp: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """(folder to serve, --quantize value, float weights it stands for), in tmp / kind."""
    state, target = load_file(str(base / "model.safetensors")), tmp / kind
    if kind in ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"):
        return base, kind, bnb_reference(state, kind)
    if kind == "bitsandbytes-nf4-saved":
        nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        return target, "bitsandbytes-nf4", transformers_prequantized(base, target, **nf4)
    if kind == "gptq":
        config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
        return target, "gptq", save_quantized(base, target, config, lambda w: gptq_tensors(w, 4, 32, True))
    config = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    return target, "awq", save_quantized(base, target, config, lambda w: awq_tensors(w, 64))


def reference_model(base: Path, state: dict[str, torch.Tensor], adapter: Path | None):
    """transformers (+ peft) with the dequantized weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_state_dict(state, strict=False)
    return model if adapter is None else PeftModel.from_pretrained(model, adapter)


def reference_generation(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their logprobs."""
    prompt = torch.tensor([ids])
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.no_grad():
        logprobs = model(out).logits[0].log_softmax(-1)
    new = out[0, len(ids):]
    return new.tolist(), logprobs[len(ids) - 1 : -1].gather(1, new[:, None]).squeeze(1)


def run_batch(generator, requests):
    """Prefill every request in one batch and decode to the end: {id: (tokens, logprobs)}."""
    out = {r.id: ([], []) for r in requests}
    gens, batch = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=requests)))
    while True:
        done = set()
        for g in gens:
            out[g.request_id][0].extend(g.next_tokens.ids)
            out[g.request_id][1].extend(g.next_tokens.logprobs)
            if g.HasField("generated_text"):
                done.add(g.request_id)
        if batch is not None and done:
            keep = [r.id for r in batch.requests if r.id not in done]
            batch = batch.filter(keep, generator.cache) if keep else batch.release(generator.cache)
        if batch is None:
            return out
        gens, batch = generator.decode([batch])


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    """A tiny float Llama and two adapters on different modules, shared by the quantized-base tests."""
    root = tmp_path_factory.mktemp("quantized-base")
    model = make_model("llama", root / "base")
    adapters = [make_adapter(model, root / "a1", 1, 8, 16, ["q_proj", "v_proj"]),
                make_adapter(model, root / "a2", 2, 4, 8, ["o_proj", "gate_proj", "up_proj", "down_proj"])]
    return root / "base", adapters


@pytest.mark.parametrize("kind", ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "bitsandbytes-nf4-saved",
                                  "gptq", "awq"])
def test_quantized_base_with_mixed_adapters_matches_peft(kind, base_and_adapters, tmp_path, monkeypatch):
    base, adapters = base_and_adapters
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(adapters[0].parent))
    folder, quantize, state = checkpoint(kind, base, tmp_path)
    generator = build_service(str(folder), None, "hub", None, Parallel(), CPU, "/unused", quantize=quantize).generator
    assert any(isinstance(layer, QuantizedLinear) for layer in vars(generator.model.layers[0]).values())
    generator.allocate_cache(2048)
    for i, adapter in enumerate(adapters):
        generator.adapters.load(AdapterKey((str(adapter),), "local"), i + 1)
    tok = generator.tokenizer
    requests = []
    for j in range(6):  # request j uses adapter j % 3 (0: the base alone), all in one batch
        requests.append(make_request(tok, j, PROMPTS[j % len(PROMPTS)], 5))
        requests[-1].adapter_index = j % 3
    ours = run_batch(generator, requests)
    for index in range(3):
        model = reference_model(base, state, adapters[index - 1] if index else None)
        for request in requests[index::3]:
            tokens, logprobs = reference_generation(model, list(request.tokenized_inputs.ids), 5)
            assert ours[request.id][0] == tokens, f"{kind} request {request.id} (adapter {index})"
            torch.testing.assert_close(torch.tensor(ours[request.id][1]), logprobs, rtol=0, atol=LOGPROB_TOLERANCE)
    assert len({tuple(v[0]) for v in ours.values()}) > 2, "adapters must change the output"


def test_int8_rows_look_up_what_the_head_multiplies():
    table = QuantizedRows(torch.randn(50, 64), torch.float32)
    ids = torch.tensor([0, 17, 49, 17, 31])
    torch.testing.assert_close(table[ids], table.dequantize()[ids], rtol=0, atol=0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(table(x), F.linear(x, table.dequantize()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_int8_embeddings_hold_one_table_and_keep_the_output(tied, tmp_path, monkeypatch):
    """LORAX_QUANTIZE_EMBEDDINGS=int8: the embedding and LM head become int8 rows (one object when tied), and greedy
    output stays that of the float tables."""
    make_model("llama", tmp_path / "base", tie_word_embeddings=tied)
    requests = [make_request_for(tmp_path / "base", j) for j in range(3)]
    outputs = {}
    for mode in ("float", "int8"):
        monkeypatch.setenv(EMBEDDINGS_ENV, mode)
        generator = build_service(str(tmp_path / "base"), None, "hub", None, Parallel(), CPU, "/unused",
                                  quantize="bitsandbytes").generator
        generator.allocate_cache(2048)
        outputs[mode] = run_batch(generator, requests)
    model = generator.model
    assert isinstance(model.lm_head, QuantizedRows) and isinstance(model.embed, QuantizedRows)
    assert (model.embed is model.lm_head) == tied
    for j in range(3):
        assert outputs["int8"][j][0] == outputs["float"][j][0]
        torch.testing.assert_close(torch.tensor(outputs["int8"][j][1]), torch.tensor(outputs["float"][j][1]),
                                   rtol=0, atol=0.05)


def make_request_for(folder: Path, j: int) -> pb.Request:
    from transformers import AutoTokenizer

    return make_request(AutoTokenizer.from_pretrained(folder), j, PROMPTS[j % len(PROMPTS)], 5)


def test_int8_embeddings_need_quantize_and_a_known_value(monkeypatch):
    monkeypatch.setenv(EMBEDDINGS_ENV, "int8")
    assert int8_embeddings("bitsandbytes-nf4")
    with pytest.raises(ValueError, match="needs --quantize"):
        int8_embeddings(None)
    monkeypatch.setenv(EMBEDDINGS_ENV, "int4")
    with pytest.raises(ValueError, match="float or int8"):
        int8_embeddings("bitsandbytes")
    monkeypatch.delenv(EMBEDDINGS_ENV)
    assert not int8_embeddings("bitsandbytes")


@pytest.mark.parametrize("quantize,settings", [
    ("bitsandbytes", dict(load_in_8bit=True)),
    ("bitsandbytes-fp4", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
])
def test_transformers_saved_checkpoints_read_as_bitsandbytes_dequantizes_them(quantize, settings, base_and_adapters,
                                                                            tmp_path):
    base, _ = base_and_adapters
    state = transformers_prequantized(base, tmp_path / "q", **settings)
    weights = Weights(tmp_path / "q", torch.float32, CPU, quantize=quantize)
    x = torch.randn(3, 64)
    for prefix in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        expected = state[f"{prefix}.weight"]
        half = expected.shape[0] // 2  # a rank's rows
        linear = weights.linear_rows([(prefix, half, 2 * half)])
        assert isinstance(linear, QuantizedLinear)
        torch.testing.assert_close(linear(x), F.linear(x, expected[half:]), rtol=1e-5, atol=1e-5)


def test_shards_load_their_slices_of_a_quantized_checkpoint(tmp_path):
    """Two ranks of an act-order GPTQ checkpoint: column- and row-parallel slices multiply as the whole does."""
    base = tmp_path / "base"
    make_model("llama", base)
    folder, quantize, state = checkpoint("gptq", base, tmp_path)
    x = torch.randn(3, 128)
    for rank in range(2):
        weights = Weights(folder, torch.float32, CPU, rank, 2, quantize=quantize)
        gate_up = weights.linear_rows([("model.layers.0.mlp.gate_proj", 64 * rank, 64 * rank + 64),
                                       ("model.layers.0.mlp.up_proj", 64 * rank, 64 * rank + 64)])
        expected = torch.cat([state["model.layers.0.mlp.gate_proj.weight"][64 * rank : 64 * rank + 64],
                              state["model.layers.0.mlp.up_proj.weight"][64 * rank : 64 * rank + 64]])
        torch.testing.assert_close(gate_up(x[:, :64]), F.linear(x[:, :64], expected), rtol=1e-4, atol=1e-4)
        down = weights.linear_cols("model.layers.0.mlp.down_proj", 64 * rank, 64 * rank + 64)
        whole = state["model.layers.0.mlp.down_proj.weight"][:, 64 * rank : 64 * rank + 64]
        torch.testing.assert_close(down(x[:, 64:]), F.linear(x[:, 64:], whole), rtol=1e-4, atol=1e-4)
    awq, quantize, _ = checkpoint("awq", base, tmp_path)  # plain groups of 64: four shards would cut them
    with pytest.raises(ValueError, match=r"input features \[0, 32\) of this shard cut a quantization group of 64"):
        Weights(awq, torch.float32, CPU, 0, 4, quantize=quantize).linear_cols("model.layers.0.mlp.down_proj", 0, 32)
