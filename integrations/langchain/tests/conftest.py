"""Fixtures for langchain-safeguard: ChatSafeguard on a tiny random Llama (fast, exact) and on the embedded model."""

from __future__ import annotations

import pytest
from _fixtures import tiny_steered_llm, tokenizer  # noqa: F401  (safeguard's shared set-up; tokenizer is a fixture)


@pytest.fixture
def tiny_llm(tokenizer):  # noqa: F811
    """A SteeredLLM on a tiny random Llama with the embedded tokenizer; its active policy always fires."""
    return tiny_steered_llm(tokenizer)
