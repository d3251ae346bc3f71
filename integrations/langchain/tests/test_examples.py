"""The examples in examples/ run end to end in their fast mode (2 prompts, 8 new tokens).

With the shipped assets (bundled SAE, policies/default.yaml, eu.yaml, us.yaml) they run exactly as a user
would run them. While those are still missing, the real-asset runs skip and the same scripts run on the
embedded model with the stand-in SAE and stand-in policy files, so their code paths stay tested.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import langchain_safeguard._loading as loading
import pytest
import yaml
from _embedded import bundled_ready, same_model, shipped_policy, stand_in_llm, stand_in_policy

from safeguard import Policy, SteeredLLM

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NEEDS = {"chatbot": ["default"], "region_swap": ["eu", "us"], "langchain_chain": ["default", "eu", "us"], "guard_any_model": ["default"]}

pytestmark = pytest.mark.slow


def run_example(name: str, *args: str) -> str:
    argv = sys.argv
    sys.argv = [str(EXAMPLES / f"{name}.py"), "--fast", *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return name


def missing_assets(name: str) -> str | None:
    if not bundled_ready():
        return "the bundled SAE of the embedded model is not installed yet (issue 3 ships it)"
    missing = [f"policies/{p}.yaml" for p in NEEDS[name] if shipped_policy(p) is None]
    return f"{', '.join(missing)} not there yet (issue 3 ships the policies)" if missing else None


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_example_runs_fast_with_the_shipped_assets(name, capsys):
    if reason := missing_assets(name):
        pytest.skip(reason)
    run_example(name)
    out = capsys.readouterr().out
    assert "fired" in out
    if name == "guard_any_model":  # the phishing request is screened out, the bread question reaches the guarded model
        assert "answered by the guard: I can't help" in out and "fired: nothing; answered by the guarded model" in out


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """from_pretrained() returns the embedded model with the stand-in SAE; policy files: default and eu fire, us never does."""
    for name, threshold in (("default", -1.0), ("eu", -1.0), ("us", 1e9)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(stand_in_policy(threshold=threshold, strength=4.0, name=f"stand-in-{name}")))
    base = stand_in_llm()

    def from_pretrained(model=None, *, sae=None, policy=None, **kw):
        return same_model(base, Policy.load(policy) if policy is not None else base.policy)

    monkeypatch.setattr(SteeredLLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading, "_shared", {})
    return tmp_path


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_example_runs_fast_on_stand_ins(name, stand_ins, capsys):
    if missing_assets(name) is None:
        pytest.skip("the shipped assets are there; the run with them covers this example")
    args = ["--policy", str(stand_ins / "default.yaml")] if name in ("chatbot", "guard_any_model") else ["--policies", str(stand_ins)]
    run_example(name, *args)
    out = capsys.readouterr().out
    if name == "chatbot":
        assert out.count("bot> ") == 2 and "stand-in-default 1: fired cyber" in out
    elif name == "guard_any_model":
        assert out.count("fired: cyber; answered by the guard") == 2
    elif name == "region_swap":
        assert out.count("handled differently in the EU and the US") == 2
        assert out.count("fired=['cyber']") == 2 and out.count("fired=[]") == 2
    else:
        assert out.count("[event safeguard_report: policy stand-in-default fired ['cyber']]") == 2
        assert "eu: fired ['cyber']" in out and "us: fired []" in out and "tokens: {'input_tokens'" in out
