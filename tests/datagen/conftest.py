"""Fixtures of the datagen tests: one tiny random HF chat model per session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dg_helpers import corpus_texts, single_thread

from longpo_megatron.datagen.tiny_model import make_tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run torch on one thread (see dg_helpers.single_thread)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + BPE tokenizer trained on the bundled corpus; answers stop early
    (end-of-turn logit bias) so sampled answers are short and usually finish."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus_texts(), eos_bias=2.5)
