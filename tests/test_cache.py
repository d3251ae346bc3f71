"""The lab's caches never run code: selection's cache is safetensors + JSON, the reply caches are JSON, and a file
that does not load (an old pickle, a planted or corrupt file) is ignored and recomputed."""

from __future__ import annotations

import json
import logging
import pickle
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from safeguard.lab import _cache
from safeguard.lab.selection.activations import PromptStats, ReplyStats
from safeguard.lab.selection.data import _cached
from safeguard.lab.selection.stats import GroupSummary, RunningStats


class _Planted:
    """Unpickling this creates ``marker``: the payload of a planted cache file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, how="torch.save"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":
        torch.save({"pwned": _Planted(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"pwned": _Planted(marker)}))


def _running(d=3, groups=("a", "b"), seed=0):
    g = torch.Generator().manual_seed(seed)
    rs = RunningStats(d, list(groups))
    for name in groups:
        rs.update(name, torch.randn(4, d, generator=g))
    return rs


def _same_running(a, b):
    assert (a.d, a.groups) == (b.d, b.groups)
    for k in ("n", "sum", "sumsq", "fires"):
        assert getattr(a, k).dtype == getattr(b, k).dtype
        assert torch.equal(getattr(a, k), getattr(b, k))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_the_planted_pickle_runs_code_when_unpickled(tmp_path, how):
    """The payload works: the old ``torch.load(weights_only=False)`` would have run it."""
    path, marker = tmp_path / "x.pt", tmp_path / "marker"
    _plant(path, marker, how)
    with path.open("rb") as f:  # a file object: torch.load may treat a *.safetensors name differently
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("kind", ["prompts", "pooled", "valscores", "replies", "causal"])
def test_a_planted_pickle_at_the_cache_path_is_not_run_and_the_value_is_recomputed(tmp_path, caplog, kind, how):
    marker = tmp_path / "marker"
    path = tmp_path / "cache" / "selection" / f"{kind}-0123456789abcdef0123.safetensors"
    _plant(path, marker, how)
    (path.with_suffix(".pt")).write_bytes(path.read_bytes())  # an old-format file beside it, too
    calls = []

    def make():
        calls.append(1)
        return {"x": torch.arange(3.0)}

    with caplog.at_level(logging.WARNING, logger="safeguard"):
        value = _cached(path, make)
    assert not marker.exists()
    assert calls == [1]
    assert torch.equal(value["x"], torch.arange(3.0))
    assert "ignoring the unreadable cache file" in caplog.text
    # the planted file was replaced by the recomputed value, which is now read back without calling make
    again = _cached(path, make)
    assert calls == [1] and torch.equal(again["x"], torch.arange(3.0))
    assert not marker.exists()


def test_the_cache_refuses_paths_that_are_not_safetensors(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        _cached(tmp_path / "prompts-abc.pt", dict)


@pytest.mark.parametrize("content", [
    b"",
    b"\x80\x04garbage",
    b"not a safetensors file at all",
])
def test_a_corrupt_cache_file_is_recomputed(tmp_path, content):
    path = tmp_path / "pooled-x.safetensors"
    path.write_bytes(content)
    assert torch.equal(_cached(path, lambda: torch.ones(2)), torch.ones(2))
    assert torch.equal(_cache.load(path), torch.ones(2))


@pytest.mark.parametrize("metadata", [
    None,  # a safetensors file, but not one of ours
    {"safeguard.cache": json.dumps({"version": 0, "value": 1})},  # another version
    {"safeguard.cache": json.dumps({"version": 1, "value": {"type": "os.system", "state": {"dict": []}}})},
    {"safeguard.cache": json.dumps({"version": 1, "value": {"type": "GroupSummary", "state": {"dict": [["n", 1]]}}})},
    {"safeguard.cache": json.dumps({"version": 1, "value": {"tensor": "missing"}})},
    {"safeguard.cache": json.dumps({"version": 1, "value": {"__reduce__": ["os.system", "true"]}})},
    {"safeguard.cache": "{not json"},
])
def test_a_safetensors_file_that_is_not_a_valid_cache_is_recomputed(tmp_path, metadata):
    path = tmp_path / "causal-x.safetensors"
    save_file({"t0": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(Exception):  # noqa: B017 - any error: the point is that nothing else happens
        _cache.load(path)
    assert _cached(path, lambda: {3: {"refusal": 0.5}}) == {3: {"refusal": 0.5}}


def test_prompt_stats_round_trip(tmp_path):
    value = PromptStats(_running(5, ["harm", "benign", "harm@wrapped"]), _running(4, ["harm", "benign"], seed=1), 12.5)
    _cache.save(value, tmp_path / "p.safetensors")
    back = _cache.load(tmp_path / "p.safetensors")
    assert isinstance(back, PromptStats)
    _same_running(back.detect, value.detect)
    _same_running(back.resid, value.resid)
    assert back.resid_norm == 12.5
    assert torch.equal(back.detect.summary(["harm", "benign"]).mean, value.detect.summary(["harm", "benign"]).mean)


def test_reply_stats_round_trip(tmp_path):
    value = ReplyStats(_running(6, ["refusal", "compliance"]), _running(3, ["refusal", "compliance"], seed=2))
    _cache.save(value, tmp_path / "r.safetensors")
    back = _cache.load(tmp_path / "r.safetensors")
    assert isinstance(back, ReplyStats)
    _same_running(back.sae, value.sae)
    _same_running(back.resid, value.resid)
    assert torch.equal(back.refusal_direction(), value.refusal_direction())


def test_group_summaries_round_trip_even_when_their_tensors_share_storage(tmp_path):
    z = torch.zeros(4, dtype=torch.float64)
    value = [GroupSummary(0, z, z, z), GroupSummary(3, torch.arange(4.0), torch.ones(4), torch.full((4,), 0.5))]
    _cache.save(value, tmp_path / "g.safetensors")
    back = _cache.load(tmp_path / "g.safetensors")
    assert [type(b) for b in back] == [GroupSummary, GroupSummary]
    for a, b in zip(value, back, strict=True):
        assert a.n == b.n
        for k in ("mean", "std", "fire"):
            assert getattr(a, k).dtype == getattr(b, k).dtype and torch.equal(getattr(a, k), getattr(b, k))


def test_tensors_dicts_and_plain_values_round_trip(tmp_path):
    pooled = torch.randn(5, 3)[:, ::2]  # a non-contiguous view
    value = {
        "pooled": pooled,
        "scores": {"violence": torch.randn(7), "fraud": torch.randn(0)},
        "causal": {12: {"refusal": 0.25, "degenerate": 0.0}, 3: {"refusal": float("nan"), "degenerate": 1.0}},
        "dtypes": [torch.tensor([True, False]), torch.arange(3), torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16)],
        "plain": [1, 2.5, "x", None, True, (1, "two")],
    }
    _cache.save(value, tmp_path / "v.safetensors")
    back = _cache.load(tmp_path / "v.safetensors")
    assert torch.equal(back["pooled"], pooled)
    assert list(back["scores"]) == ["violence", "fraud"]
    assert all(torch.equal(back["scores"][k], value["scores"][k]) for k in value["scores"])
    assert list(back["causal"]) == [12, 3]  # int keys and their order survive
    assert back["causal"][12] == {"refusal": 0.25, "degenerate": 0.0}
    assert back["causal"][3]["refusal"] != back["causal"][3]["refusal"]  # nan
    for a, b in zip(value["dtypes"], back["dtypes"], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back["plain"] == [1, 2.5, "x", None, True, (1, "two")]
    assert _cache.load(tmp_path / "v.safetensors") is not None
    for plain in (torch.ones(3), 1.5, [1, 2], {"a": 1}):
        _cache.save(plain, tmp_path / "w.safetensors")
        got = _cache.load(tmp_path / "w.safetensors")
        assert torch.equal(got, plain) if isinstance(plain, torch.Tensor) else got == plain


def test_saving_an_unknown_type_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        _cache.save({"x": SimpleNamespace(a=1)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_the_cache_file_holds_no_pickle(tmp_path):
    _cache.save(PromptStats(_running(), _running(), 1.0), tmp_path / "p.safetensors")
    data = (tmp_path / "p.safetensors").read_bytes()
    with pytest.raises(Exception):  # noqa: B017
        pickle.loads(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert json.loads(header["__metadata__"]["safeguard.cache"])["value"]["type"] == "PromptStats"


class _FakeLLM:
    model_name = "fake"

    def __init__(self):
        self.calls = 0

    def batch(self, prompts, **_):
        self.calls += 1
        return [SimpleNamespace(text=f"reply to {p}", report=SimpleNamespace(fired=[])) for p in prompts]


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", '{"replies": 5}', "\udcff"])
def test_a_corrupt_eval_reply_cache_is_regenerated(tmp_path, content):
    from safeguard.lab.evaluation import unsteered_replies

    llm = _FakeLLM()
    assert unsteered_replies(llm, ["a", "b"], cache_dir=tmp_path, progress=False) == ["reply to a", "reply to b"]
    (cache,) = tmp_path.glob("unsteered-*.json")
    cache.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert unsteered_replies(llm, ["a", "b"], cache_dir=tmp_path, progress=False) == ["reply to a", "reply to b"]
    assert llm.calls == 2
    assert unsteered_replies(llm, ["a", "b"], cache_dir=tmp_path, progress=False) == ["reply to a", "reply to b"]
    assert llm.calls == 2  # the regenerated file is read
