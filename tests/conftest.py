"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, and tiny random SAEs."""

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
def tiny_model(tokenizer):
    return make_tiny_model(len(tokenizer))


@pytest.fixture
def saes():
    from safeguard.saes import SAESet

    return SAESet([make_sae(1, seed=1), make_sae(2, seed=2)])


@pytest.fixture
def llm(tiny_model, tokenizer, saes):
    from safeguard import Policy, SteeredLLM
    from safeguard.models import LoadedModel

    loaded = LoadedModel(model=tiny_model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    return SteeredLLM(loaded, saes, Policy.from_dict(policy_dict()))
