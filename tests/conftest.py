"""Shared fixtures: tiny models saved once per session."""
from __future__ import annotations

import pytest

from tests.tiny_models import make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with its tokenizer: (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, make_model("llama", folder)


@pytest.fixture(scope="session")
def served_from_hub(tmp_path_factory):
    """One real launcher (plain logs) whose adapters come from a local hub (tests/fake_hub.py), shared by the
    end-to-end tests of private adapters, credential leaks and hung sources."""
    from tests.fake_hub import hub_launcher

    with hub_launcher(tmp_path_factory.mktemp("served-from-hub")) as served:
        yield served


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is visible (scripts/gpu_check.sh runs them with `-m gpu`)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
