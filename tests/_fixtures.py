"""Set-up and fixtures shared by safeguard's tests and langchain-safeguard's (both conftests import this).

Importing it sets the offline environment before transformers is imported and pins torch to one thread."""

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
    """The embedded model's tokenizer, padding on the left as generation needs."""
    from transformers import AutoTokenizer

    from safeguard.runtime.models import embedded_model_folder

    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    tok.padding_side = "left"
    return tok


def tiny_steered_llm(tokenizer, model=None, saes=None):
    """A SteeredLLM on a tiny random Llama with the embedded tokenizer and tiny SAEs at layers 1 and 2; its
    active policy always fires."""
    from safeguard import Policy, SteeredLLM
    from safeguard.runtime.models import LoadedModel
    from safeguard.runtime.saes import SAESet

    model = model if model is not None else make_tiny_model(len(tokenizer))
    saes = saes if saes is not None else SAESet([make_sae(1, seed=1), make_sae(2, seed=2)])
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    return SteeredLLM(loaded, saes, Policy.from_dict(policy_dict()))
