"""The embedded model for tests: the real default when its bundled SAEs are installed, else a stand-in.

Until the bundled SAEs exist, the stand-in is a random SAE at layer 10 and a policy that detects but never
fires, so LangChain's standard suites still exercise the real model, chat template and steering hooks.
"""

from __future__ import annotations

import functools

import torch
from _tiny import policy_dict

STAND_IN_RELEASE = "stand-in-random"


def bundled_ready() -> bool:
    from safeguard.runtime.saes import bundled_sae_dirs

    return bool(bundled_sae_dirs())


def _stand_in_sae(layer: int, d_in: int, seed: int):
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    from safeguard.runtime.models import EMBEDDED_MODEL_NAME
    from safeguard.runtime.saes import LoadedSAE

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name=EMBEDDED_MODEL_NAME)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=meta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return LoadedSAE(sae=sae, release=STAND_IN_RELEASE, layer=layer, hook_name=meta.hook_name, model_name=EMBEDDED_MODEL_NAME, source="test")


def stand_in_policy(threshold: float = 1e9, strength: float = 2.0, name: str = "stand-in") -> dict:
    """A policy for the embedded model with the stand-in SAE (threshold 1e9 never fires, -1 always does)."""
    from safeguard.runtime.models import EMBEDDED_MODEL_NAME

    d = policy_dict(threshold=threshold, detect_layer=10, steer=[{"kind": "add", "layer": 10, "feature": 7, "strength": strength,
                                                                   "positions": "generated"}])
    return {**d, "name": name, "model": EMBEDDED_MODEL_NAME, "sae": STAND_IN_RELEASE}


@functools.cache
def stand_in_llm():
    """The embedded model with a random stand-in SAE, loaded once per test session."""
    from safeguard import Policy, SteeredLLM
    from safeguard.runtime.models import load_model
    from safeguard.runtime.saes import SAESet

    loaded = load_model(None, device="cpu")
    return SteeredLLM(loaded, SAESet([_stand_in_sae(10, int(loaded.model.config.hidden_size), 10)]), Policy.from_dict(stand_in_policy()))


def embedded_params() -> dict:
    """ChatSafeguard arguments for the embedded model: the real default when installed, else the stand-in."""
    return {} if bundled_ready() else {"llm": stand_in_llm()}


def shipped_policy(name: str):
    """``policies/NAME.yaml`` of the repository, or None while it is not there yet."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "policies" / f"{name}.yaml"
    return path if path.is_file() else None


def embedded_policy_pair():
    """Two policies for the embedded model that treat requests differently: the shipped EU and US
    policies with the bundled SAE, else an always-firing and a never-firing stand-in policy."""
    import pytest

    from safeguard import Policy

    if bundled_ready():
        eu, us = shipped_policy("eu"), shipped_policy("us")
        if eu is None or us is None:
            pytest.skip("policies/eu.yaml and policies/us.yaml are not there yet (issue 3 ships them)")
        return Policy.load(eu), Policy.load(us)  # a request passes Policy objects or names, never paths
    return Policy.from_dict(stand_in_policy(threshold=-1.0, strength=4.0, name="fire")), Policy.from_dict(stand_in_policy())


def same_model(llm, policy=None):
    """Another SteeredLLM on the same loaded model and SAEs (nothing is copied), with its own active policy."""
    from safeguard import SteeredLLM
    from safeguard.runtime.models import LoadedModel

    loaded = LoadedModel(model=llm.model, tokenizer=llm.tokenizer, name=llm.model_name, source="test", quantization=None)
    return SteeredLLM(loaded, llm.saes, policy)
