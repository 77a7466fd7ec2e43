"""Reading an adapter (the DownloadAdapter RPC) does not wait for the model thread, and its torch work runs on one
thread: decode keeps the model thread and its OpenMP team while an adapter is read from disk."""
from __future__ import annotations

import asyncio
import threading

import torch

from lorax_server.dist import Parallel
from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import LoraxService, model_thread
from lorax_server.shard import build_service
from tests.tiny_models import make_adapter, make_model


def test_an_adapter_is_read_while_the_model_thread_is_busy(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    model = make_model("llama", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", 1, 8, 16, ["q_proj", "v_proj"])
    worker = model_thread()
    generator = worker.submit(
        lambda: build_service(str(tmp_path / "base"), None, "hub", "float32", Parallel(), torch.device("cpu"), "/unused",
                              worker=worker).generator
    ).result()
    service = LoraxService(generator, Parallel(), "/unused", worker)
    model_threads = worker.submit(torch.get_num_threads).result()
    busy, release = threading.Event(), threading.Event()
    worker.submit(lambda: (busy.set(), release.wait(30)))  # a long decode step, say
    busy.wait()
    request = pb.DownloadAdapterRequest(
        adapter_parameters=pb.AdapterParameters(adapter_ids=[str(adapter)]), adapter_source=pb.AdapterSource.LOCAL
    )

    async def download():
        return await asyncio.wait_for(service.DownloadAdapter(request, None), 20)

    try:
        response = asyncio.run(download())
    finally:
        release.set()
    assert response.downloaded and response.memory.host_adapters == 1, "read into the host tier, model thread still busy"
    assert service._reader.submit(torch.get_num_threads).result() == 1, "the reader forms no OpenMP team"
    assert worker.submit(torch.get_num_threads).result() == model_threads, "the model thread keeps its threads"

    loaded = asyncio.run(service.LoadAdapter(pb.LoadAdapterRequest(
        adapter_parameters=request.adapter_parameters, adapter_source=pb.AdapterSource.LOCAL, adapter_index=1), None))
    assert loaded.loaded and loaded.memory.device_adapters == 1
