"""Device and limit rules that a CUDA host depends on, checked on the CPU: one GPU per shard, the default GPU dtype,
and batches whose token ids or lengths the model cannot take refused with the reason before any forward."""
from __future__ import annotations

import pytest
import torch

from lorax_server import dist
from lorax_server.dist import Parallel
from lorax_server.models import choose_dtype
from lorax_server.shard import build_service
from lorax_server.pb import generate_pb2 as pb
from tests.e2e import Launcher
from tests.test_shard_exactness import make_request


def test_more_shards_than_gpus_is_a_start_up_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="2 shards need 2 GPUs, but 1 CUDA device"):
        dist.select_device(1, world_size=2)


def test_gpu_default_dtype_is_bfloat16_where_supported(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_dtype(None, gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_dtype(None, gpu) is torch.float16
    assert choose_dtype("bfloat16", gpu) is torch.bfloat16
    assert choose_dtype(None, torch.device("cpu")) is torch.float32


def test_out_of_range_ids_and_lengths_fail_their_batch_before_the_forward(tiny_model_dir):
    folder, _ = tiny_model_dir
    generator = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    generator.allocate_cache(2048)
    tok, vocab = generator.tokenizer, generator.vocab
    free = generator.cache.free_blocks
    bad_id = make_request(tok, 1, "Hello world", 4)
    bad_id.tokenized_inputs.ids[0] = vocab
    with pytest.raises(ValueError, match=f"outside the vocabulary \\(0..{vocab - 1}\\)"):
        generator.new_batch(pb.Batch(id=1, requests=[make_request(tok, 0, "Hello", 4), bad_id]))
    too_long = make_request(tok, 2, "Hello world", 600)  # the tiny model has 512 positions
    with pytest.raises(ValueError, match="exceed the model's 512 positions .max_position_embeddings."):
        generator.new_batch(pb.Batch(id=2, requests=[too_long]))
    assert generator.cache.free_blocks == free, "a refused batch reserves no KV blocks"
    _, batch = generator.prefill(generator.new_batch(pb.Batch(id=3, requests=[make_request(tok, 3, "Hello", 2)])))
    assert batch is not None, "the shard still serves"


def test_max_total_tokens_beyond_the_model_positions_stops_the_launcher(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir
    launcher = Launcher(str(folder), tmp_path, "--max-input-length", "32", "--max-total-tokens", "1024", "--compile")
    try:
        with pytest.raises(RuntimeError, match="launcher exited") as failure:
            launcher.wait_ready(timeout=120)
        assert "exceed the model's 512 positions (max_position_embeddings); lower --max-total-tokens" in str(failure.value)
        launcher.log.seek(0)
        assert "--compile has no effect on CPU" in launcher.log.read(), "a flag that does nothing on CPU says so"
    finally:
        launcher.stop()
