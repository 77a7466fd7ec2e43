"""Shared fixtures: tiny models saved once per session."""
from __future__ import annotations

import pytest

from tests.tiny_models import make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with its tokenizer: (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, make_model("llama", folder)
