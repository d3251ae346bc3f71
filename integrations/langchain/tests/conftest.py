"""Fixtures for langchain-safeguard: ChatSafeguard on a tiny random Llama (fast, exact) and on the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from _tiny import make_sae, make_tiny_model, policy_dict

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from safeguard.models import embedded_model_folder

    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    tok.padding_side = "left"
    return tok


@pytest.fixture
def tiny_llm(tokenizer):
    """A SteeredLLM on a tiny random Llama with the embedded tokenizer; its active policy always fires."""
    from safeguard import Policy, SteeredLLM
    from safeguard.models import LoadedModel
    from safeguard.saes import SAESet

    loaded = LoadedModel(model=make_tiny_model(len(tokenizer)), tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    return SteeredLLM(loaded, SAESet([make_sae(1, seed=1), make_sae(2, seed=2)]), Policy.from_dict(policy_dict()))
