"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, and tiny random SAEs."""

from __future__ import annotations

import pytest
from _fixtures import tiny_steered_llm, tokenizer  # noqa: F401  (tokenizer is a fixture)
from _tiny import make_sae, make_tiny_model


@pytest.fixture
def tiny_model(tokenizer):  # noqa: F811
    return make_tiny_model(len(tokenizer))


@pytest.fixture
def saes():
    from safeguard.runtime.saes import SAESet

    return SAESet([make_sae(1, seed=1), make_sae(2, seed=2)])


@pytest.fixture
def llm(tiny_model, tokenizer, saes):  # noqa: F811
    return tiny_steered_llm(tokenizer, tiny_model, saes)
