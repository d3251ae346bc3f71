"""Factories for tiny random models, SAEs and policies used across the tests."""

from __future__ import annotations

import torch

HIDDEN = 32
LAYERS = 4
D_SAE = 64


def make_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def make_sae(layer: int, *, arch: str = "standard", seed: int = 0, release: str = "tiny-sae", model_name: str = "tiny-llama",
             d_in: int = HIDDEN, d_sae: int = D_SAE):
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    from safeguard.runtime.saes import LoadedSAE

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name=model_name)
    cls, cfg_cls = {"standard": (StandardSAE, StandardSAEConfig), "gated": (GatedSAE, GatedSAEConfig),
                    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[arch]
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return LoadedSAE(sae=sae, release=release, layer=layer, hook_name=meta.hook_name, model_name=model_name, source="test")


def policy_dict(*, threshold: float = -1.0, steer=None, detect_layer: int = 1, mode: str = "enforce", features=(3, 5), categories=None):
    """A policy for the tiny model. threshold -1 always fires (activations are >= 0); 1e9 never does."""
    cat = {
        "id": "cyber",
        "label": "Cyber attacks",
        "detect": {"layer": detect_layer, "features": list(features), "threshold": threshold},
        "steer": steer if steer is not None else [{"kind": "add", "layer": 2, "feature": 7, "strength": 4.0}],
    }
    return {
        "schema_version": 1,
        "name": "tiny",
        "version": "1",
        "taxonomy": {"name": "AIR-Bench", "version": "2024"},
        "model": "tiny-llama",
        "sae": "tiny-sae",
        "mode": mode,
        "categories": categories if categories is not None else [cat],
    }


def hooks_on(model) -> int:
    """Number of forward hooks and pre-hooks anywhere on the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def write_tiny_pack(folder, *, redirect: bool = True):
    """A detector pack for the tiny model and its SAEs (layers 1 and 2): ``cyber`` fires on every prompt at the
    standard and strict levels (activations are >= 0 > -1) and never at relaxed; ``fraud`` never fires."""
    from pathlib import Path

    import yaml
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    if redirect:
        save_file({"cyber": torch.randn(HIDDEN, generator=g), "fraud": torch.randn(HIDDEN, generator=g)}, str(folder / "pack.vectors.safetensors"))

    def category(label, relaxed, standard, strict):
        return {"label": label, "detect": {"layer": 1, "features": [3, 5], "combine": "max", "reduce": "max"},
                "levels": {"relaxed": {"threshold": relaxed, "fpr": 0.0, "recall": 0.1}, "standard": {"threshold": standard, "fpr": 0.01, "recall": 0.5},
                           "strict": {"threshold": strict, "fpr": 0.05, "recall": 0.9}},
                "curve": [{"max_false_positive_rate": 0.0, "threshold": 1e9, "fpr": 0.0, "recall": 0.0},
                          {"max_false_positive_rate": 0.02, "threshold": -1.0, "fpr": 0.02, "recall": 1.0}]}

    pack = {"schema_version": 1, "id": "tiny-pack", "model": "tiny-llama", "sae": "tiny-sae", "taxonomy": {"name": "AIR-Bench", "version": "2024"},
            "measured": True, "levels": {"relaxed": {"max_false_positive_rate": 0.0}, "standard": {"max_false_positive_rate": 0.01},
                                         "strict": {"max_false_positive_rate": 0.05}},
            "refusal": [{"kind": "add", "layer": 2, "feature": 7, "strength": 4.0}],
            "categories": {"cyber": category("Cyber attacks", 1e9, -1.0, -1.0), "fraud": category("Fraud", 1e9, 1e9, 1e9)}}
    if redirect:
        pack["redirect"] = {"file": "pack.vectors.safetensors", "layer": 2, "strength": 2.0, "positions": "both"}
    (folder / "pack.yaml").write_text(yaml.safe_dump(pack, sort_keys=False))
    return folder / "pack.yaml"


def policy_v2(**categories):
    """A schema-2 policy over the tiny pack's categories (each rule a dict; default: both categories, standard)."""
    return {"schema_version": 2, "name": "tiny2", "version": "1", "taxonomy": {"name": "AIR-Bench", "version": "2024"},
            "categories": categories or {"cyber": {}, "fraud": {}}}


def first_turn_feature(llm, messages, layer: int = 1):
    """A layer-``layer`` SAE feature of ``llm`` that is stronger on the earlier user turns of ``messages`` than on its
    last user turn (read in context), and a threshold between the two: a detector on it with ``turns: all`` fires,
    with ``turns: last`` it does not. Returns ``(feature, threshold)``."""
    ids, user, last = llm.token_masks(messages)
    user, last = torch.tensor(user), torch.tensor(last)
    earlier = user & ~last
    assert earlier.any() and last.any()
    with torch.no_grad():
        h = llm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]  # layer's output
        acts = llm.saes[layer].sae.encode(h)  # (P, d_sae)
    gap = acts[earlier].amax(0) - acts[last].amax(0)
    f = int(gap.argmax())
    assert gap[f] > 0.05, "no feature separates the turns on this tiny model"
    return f, float((acts[earlier, f].max() + acts[last, f].max()) / 2)


def explicit_policy(feature: int, threshold: float, *, turns: str | None = None, response: str = "monitor", name: str = "turns"):
    """A schema-2 policy with one explicit ``cyber`` detector on one layer-1 feature (``turns`` left out: the default)."""
    detect = {"layer": 1, "features": [feature], "threshold": threshold}
    if turns is not None:
        detect["turns"] = turns
    return {"schema_version": 2, "name": name, "version": "1", "taxonomy": {"name": "AIR-Bench", "version": "2024"}, "model": "tiny-llama",
            "sae": "tiny-sae", "categories": {"cyber": {"response": response, "detect": detect,
                                                        "steer": [{"kind": "add", "layer": 2, "feature": 7, "strength": 4.0}]}}}
