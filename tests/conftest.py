"""Shared fixtures: tiny models saved once per session."""
from __future__ import annotations

import pytest

from tests.tiny_models import make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with its tokenizer: (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, make_model("llama", folder)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is visible (scripts/gpu_check.sh runs them with `-m gpu`)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
