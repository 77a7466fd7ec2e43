"""The demo adapter recipe, run on a tiny model: it trains once, is reused, and loads into the shard with real deltas."""
from __future__ import annotations

import torch

from lorax_server.adapters.registry import AdapterKey
from lorax_server.demo_adapters import QA, demo_adapters, pirate
from lorax_server.dist import Parallel
from lorax_server.shard import build_service


def test_demo_adapters_train_once_and_load_into_the_registry(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path))
    folder, _ = tiny_model_dir
    paths = demo_adapters(folder, tmp_path)
    assert set(paths) == {"pirate", "shout"}
    stamps = {name: (path / "adapter_model.safetensors").stat().st_mtime_ns for name, path in paths.items()}
    assert demo_adapters(folder, tmp_path) == paths
    assert stamps == {name: (path / "adapter_model.safetensors").stat().st_mtime_ns for name, path in paths.items()}

    service = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused")
    registry = service.generator.adapters
    weights = registry.fetch(AdapterKey(("lorax-demo-adapters/pirate",), "local"))
    assert {"q_proj", "down_proj"} <= {module for module in weights.modules}
    # The training moved B away from zero: the adapter changes the model.
    assert all(b.abs().max() > 0 for _, b in weights.modules.values())


def test_pirate_style_is_recognisable():
    assert pirate(QA[0][1]) == "Arr, matey! Th' capital o' France be Paris, arr! Yo ho ho!"
