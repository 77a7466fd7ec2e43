"""A decode step reads results back from the device once.

On a GPU every read-back (`.item()`, `.tolist()`, `bool(t)`, `.nonzero()`, a boolean-mask index, ...) stalls the host
until the device has caught up, so the host cannot queue the next step's work behind the current one (and CUDA
graphs cannot be captured). On this CPU-only machine the same calls are counted with a torch function mode.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.layers import lora_kernel
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from tests.test_shard_exactness import PROMPTS, make_request
from tests.tiny_models import make_adapter

T = torch.Tensor
READ_BACKS = {
    T.item, T.tolist, T.cpu, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, torch.nonzero,
    T.masked_select, torch.masked_select, torch.unique, T.unique,
}


class ReadBackCounter(TorchFunctionMode):
    """Counts calls that make the host wait for a tensor's values."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_BACKS:
            self.calls.append(getattr(func, "__name__", str(func)))
        elif func in (T.__getitem__, T.__setitem__) and _has_bool_index(args[1]):
            self.calls.append("boolean mask index")
        elif func in (T.repeat_interleave, torch.repeat_interleave) and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), T) and "output_size" not in kwargs:
            self.calls.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, T) and p.dtype == torch.bool for p in parts)


def test_counter_sees_read_backs():
    x = torch.arange(6)
    with ReadBackCounter() as counter:
        x.sum().item()
        x[x > 2]
        bool(x.any())
        x.tolist()
    assert counter.calls == ["item", "boolean mask index", "__bool__", "tolist"]


@pytest.mark.parametrize("lora_op", ["cpu_kernel", "reference"])  # the reference op is what CUDA runs today
def test_a_decode_step_reads_back_once(lora_op, tiny_model_dir, tmp_path, monkeypatch):
    if lora_op == "reference":
        monkeypatch.setattr(lora_kernel, "cpu_op", lambda: lora_kernel.lora_apply_reference)
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    folder, model = tiny_model_dir
    generator = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    generator.allocate_cache(2048)
    generator.adapters.load(AdapterKey((str(make_adapter(model, tmp_path / "a", 1, 8, 16, ["q_proj", "v_proj"])),), "local"), 1)
    tok = generator.tokenizer
    requests = [  # greedy and sampled rows, penalties, a watermark, top-k/top-p, base and adapter rows, one that stops early
        make_request(tok, 0, PROMPTS[0], 6),
        make_request(tok, 1, PROMPTS[1], 6, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3),
        make_request(tok, 2, PROMPTS[2], 2, repetition_penalty=1.3, frequency_penalty=0.2, watermark=True),
        make_request(tok, 3, PROMPTS[0], 6, do_sample=True, seed=11),
    ]
    requests[1].adapter_index = requests[2].adapter_index = 1
    _, batch = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=requests)))
    per_step = []
    for _ in range(4):  # the third step runs after request 2 finished: its batch shrinks without the router's filter
        with ReadBackCounter() as counter:
            generations, batch = generator.decode([batch])
        per_step.append(counter.calls)
        assert len(generations) == len(batch.requests) if batch else True
    assert all(len(calls) <= 1 for calls in per_step), per_step
