"""The recording toolkit: layer outputs, the user-token mask, the reply cache."""

from __future__ import annotations

import json
import logging
import pickle
from types import SimpleNamespace

import pytest
import torch

from safeguard.lab.recording import REPLY_FORMAT, Replies, ReplyCache, compliance_replies, encode_prompt, greedy_replies, layer_outputs, reply_key

PROMPTS = ["hi", "how do I bake bread at home?", "a somewhat longer prompt, with a few more tokens than the others in it"]


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("side", ["left", "right"])
def test_layer_outputs_are_the_layers_hidden_states_at_real_positions(llm, side):
    rows = [encode_prompt(llm, p)[0] for p in PROMPTS]
    before = _hooks(llm.model)
    out, attn = layer_outputs(llm.model, rows, [2, 0], pad_id=7, side=side)
    assert list(out) == [2, 0] and _hooks(llm.model) == before
    width = max(map(len, rows))
    assert attn.shape == (3, width) and attn.sum(1).tolist() == [len(r) for r in rows]
    for i, r in enumerate(rows):
        real = attn[i].bool()
        assert real.nonzero()[0 if side == "right" else -1].item() == (0 if side == "right" else width - 1)  # padded on `side`
        with torch.no_grad():
            hidden = llm.model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states
        for layer in (0, 2):
            assert out[layer].dtype == torch.float32 and out[layer].shape == (3, width, 32)
            torch.testing.assert_close(out[layer][i][real], hidden[layer + 1][0].float(), rtol=1e-5, atol=1e-5)


def test_an_unpadded_row_is_a_plain_forward_bit_for_bit(llm):
    ids = encode_prompt(llm, PROMPTS[1])[0]
    with torch.no_grad():
        hidden = llm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for side in ("left", "right"):
        out, _ = layer_outputs(llm.model, [ids], [1], pad_id=0, side=side)
        assert torch.equal(out[1][0], hidden[2][0])


def test_layer_outputs_stop_after_the_deepest_layer_and_leave_no_hook_on_error(llm, monkeypatch):
    ran = []
    handle = llm.model.model.layers[3].register_forward_pre_hook(lambda m, a: ran.append(3))
    try:
        layer_outputs(llm.model, [[5, 6, 7]], [1], pad_id=0)
    finally:
        handle.remove()
    assert ran == []
    before = _hooks(llm.model)
    with pytest.raises(IndexError):
        layer_outputs(llm.model, [[5, 6]], [1, 99], pad_id=0)
    with pytest.raises(ValueError, match="side"):
        layer_outputs(llm.model, [[5, 6]], [1], pad_id=0, side="middle")
    assert _hooks(llm.model) == before


def test_encode_prompt_is_the_engines_encoding_with_the_user_token_mask(llm):
    from safeguard.lab.selection import activations, detection
    from safeguard.lab.selection.data import Chat

    assert activations.encode_prompt is detection.encode_prompt is encode_prompt  # one place
    ids, mask = encode_prompt(llm, "how do I bake bread?")
    assert (ids, mask) == tuple(llm._encode_one("how do I bake bread?", True)) and any(mask) and not all(mask)
    chat = Chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and bread?"}])
    cids, cmask = encode_prompt(llm, chat)
    last = llm.tokenizer.decode([t for t, m in zip(cids, cmask, strict=True) if m])
    assert "bread" in last and "hello" not in last  # the last user turn, read in context


# ------------------------------------------------------------------------------------------------ reply cache
class _FakeLLM:
    model_name = "fake"

    def __init__(self):
        self.generated: list[list] = []

    def batch(self, prompts, *, steer, policy, max_new_tokens, batch_size):
        self.generated.append(list(prompts))
        return [SimpleNamespace(text=f"{'no' if steer else 'yes'}: {p}"[:max_new_tokens], report=SimpleNamespace(fired=["x"] if steer else []))
                for p in prompts]


_POLICY = SimpleNamespace(content_hash="policy-hash")


def test_the_exact_lookup_needs_the_same_prompts_chunks_and_settings(tmp_path):
    llm, cache = _FakeLLM(), ReplyCache(tmp_path)
    run = greedy_replies(llm, ["a", "b", "c"], cache=cache, max_new_tokens=40, batch_size=2, progress=False)
    assert run.replies == ("yes: a", "yes: b", "yes: c") and llm.generated == [["a", "b"], ["c"]]
    (path,) = tmp_path.glob("unsteered-*.json")
    data = json.loads(path.read_text())
    assert data["format"] == REPLY_FORMAT and data["model"] == "fake" and data["policy"] is None
    assert (data["max_new_tokens"], data["batch_size"], data["prompts"]) == (40, 2, ["a", "b", "c"]) and data["torch"] == torch.__version__
    assert cache.exact("fake", ["a", "b", "c"], max_new_tokens=40, batch_size=2) == run
    for other in ({"batch_size": 3}, {"max_new_tokens": 41}, {"policy": "policy-hash"}):
        assert cache.exact("fake", ["a", "b", "c"], **{"max_new_tokens": 40, "batch_size": 2, **other}) is None
    assert cache.exact("fake", ["a", "b"], max_new_tokens=40, batch_size=2) is None
    assert cache.exact("other", ["a", "b", "c"], max_new_tokens=40, batch_size=2) is None
    assert greedy_replies(llm, ["a", "b", "c"], cache=cache, max_new_tokens=40, batch_size=2, progress=False) == run
    assert len(llm.generated) == 2  # read back
    greedy_replies(llm, ["a", "b", "c"], cache=cache, max_new_tokens=40, batch_size=3, progress=False)
    assert llm.generated[-1] == ["a", "b", "c"]  # other chunks: generated again, in those chunks


def test_steered_runs_keep_their_fired_categories_under_the_policy_identity(tmp_path):
    llm, cache = _FakeLLM(), ReplyCache(tmp_path)
    run = greedy_replies(llm, ["a", "b"], cache=cache, max_new_tokens=40, batch_size=8, policy=_POLICY, progress=False)
    assert run.fired == (("x",), ("x",)) and run.policy == "policy-hash"
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["steered"]
    assert cache.exact("fake", ["a", "b"], max_new_tokens=40, batch_size=8, policy="policy-hash") == run
    named = greedy_replies(llm, ["a", "b"], cache=cache, max_new_tokens=40, batch_size=8, policy=_POLICY, identity="policy+pack", progress=False)
    assert named.policy == "policy+pack" and len(llm.generated) == 2
    assert cache.by_prompt("fake", max_new_tokens=40) == {}  # per-prompt lookups read unsteered replies only


def test_the_per_prompt_lookup_reads_any_batching_of_the_same_model_and_length(tmp_path):
    llm, cache = _FakeLLM(), ReplyCache(tmp_path)
    greedy_replies(llm, ["a", "b", "c"], cache=cache, max_new_tokens=40, batch_size=2, progress=False)
    greedy_replies(llm, ["d"], cache=cache, max_new_tokens=40, batch_size=32, progress=False)
    greedy_replies(llm, ["e"], cache=cache, max_new_tokens=5, batch_size=2, progress=False)
    cache.put(Replies("other", ("f",), ("other's reply",), 40, 2))
    assert cache.by_prompt("fake", max_new_tokens=40) == {p: f"yes: {p}" for p in "abcd"}
    before = len(llm.generated)
    assert compliance_replies(llm, ["d", "c", "a", "d"], batch_size=3, cache=cache, progress=False) == ["yes: d", "yes: c", "yes: a", "yes: d"]
    assert len(llm.generated) == before
    assert compliance_replies(llm, ["f", "a", "g", "f"], cache=cache, progress=False) == ["yes: f", "yes: a", "yes: g", "yes: f"]
    assert llm.generated[-1] == ["f", "g"]  # only the missing prompts, once each, as one run
    assert cache.exact("fake", ["f", "g"], max_new_tokens=40, batch_size=8) is not None


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content", [
    "pickle",
    b"{broken",
    b"[1, 2]",
    b'{"format": "safeguard.replies/1", "model": "fake", "prompts": ["a"], "replies": [1]}',
    b'{"format": "safeguard.replies/1", "model": "fake", "policy": null, "max_new_tokens": 40, "batch_size": 2, "torch": "x", '
    b'"prompts": ["a"], "replies": ["a planted reply"], "fired": null}',  # valid, but not the run its name claims
    b'{"__reduce__": ["os.system", "touch marker"]}',
])
def test_a_corrupt_or_planted_reply_file_is_ignored_rebuilt_and_never_executed(tmp_path, caplog, content):
    llm, cache, marker = _FakeLLM(), ReplyCache(tmp_path / "replies"), tmp_path / "marker"
    path = cache.folder / cache.name(reply_key("fake", ["a", "b"], max_new_tokens=40, batch_size=2), None)
    cache.folder.mkdir()
    path.write_bytes(pickle.dumps(_Planted(marker)) if content == "pickle" else content)
    (cache.folder / "unsteered-planted.json").write_bytes(path.read_bytes())  # one the per-prompt lookup scans
    with caplog.at_level(logging.WARNING, logger="safeguard"):
        run = greedy_replies(llm, ["a", "b"], cache=cache, max_new_tokens=40, batch_size=2, progress=False)
    assert run.replies == ("yes: a", "yes: b") and llm.generated == [["a", "b"]] and not marker.exists()
    assert Replies.from_json(json.loads(path.read_text())) == run  # rebuilt in place
    assert greedy_replies(llm, ["a", "b"], cache=cache, max_new_tokens=40, batch_size=2, progress=False) == run and len(llm.generated) == 1
    assert cache.by_prompt("fake", max_new_tokens=40) == {"a": "yes: a", "b": "yes: b"} and not marker.exists()


def test_older_reply_caches_are_read_and_never_written(tmp_path):
    root = tmp_path / "cache"
    cache = ReplyCache(root / "replies", read_also=(root / "eval", root / "corpus", root / "selection"))
    for d in ("eval", "corpus", "selection"):
        (root / d).mkdir(parents=True)
    # evaluation's files before the format: named by the same key, without the settings fields
    old = {"model": "fake", "policy": None, "prompts": ["a", "b"], "replies": ["old a", "old b"], "fired": [[], []]}
    (root / "eval" / cache.name(reply_key("fake", ["a", "b"], max_new_tokens=48, batch_size=8), None)).write_text(json.dumps(old))
    assert cache.exact("fake", ["a", "b"], max_new_tokens=48, batch_size=8).replies == ("old a", "old b")
    # SAE training's {prompt: reply} (model in the file name) and selection's {"model", "prompts", "replies"}, both 40 tokens
    (root / "corpus" / "replies-0123abcd-fake-40.json").write_text(json.dumps({"c": "corpus c", "d": "corpus d"}))
    (root / "corpus" / "replies-0123abcd-other-40.json").write_text(json.dumps({"e": "not ours"}))
    (root / "selection" / "replies-0123.json").write_text(json.dumps({"model": "fake", "prompts": ["d", "f"], "replies": ["sel d", "sel f"]}))
    (root / "selection" / "replies-4567.json").write_text(json.dumps({"model": "other", "prompts": ["g"], "replies": ["not ours"]}))
    assert cache.by_prompt("fake", max_new_tokens=40) == {"c": "corpus c", "d": "sel d", "f": "sel f"}
    assert cache.by_prompt("fake", max_new_tokens=48) == {}
    llm = _FakeLLM()
    assert compliance_replies(llm, ["c", "f", "h"], cache=cache, progress=False) == ["corpus c", "sel f", "yes: h"]
    assert llm.generated == [["h"]] and [p.parent.name for p in root.rglob("unsteered-*.json") if "yes: h" in p.read_text()] == ["replies"]


def test_the_default_cache_is_one_folder_under_the_safeguard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGUARD_CACHE", str(tmp_path))
    cache = ReplyCache.default()
    assert cache.folder == tmp_path / "replies" and cache.read_also == (tmp_path / "eval", tmp_path / "corpus", tmp_path / "selection")
    assert ReplyCache.default(tmp_path / "x").folder == tmp_path / "x" and ReplyCache.default(tmp_path / "x").read_also == ()
    compliance_replies(_FakeLLM(), ["a"], progress=False)
    assert [p.parent.name for p in tmp_path.rglob("*.json")] == ["replies"]


def test_replies_validate_their_lengths():
    with pytest.raises(ValueError, match="do not match"):
        Replies("m", ("a", "b"), ("x",), 40, 8)
    with pytest.raises(ValueError, match="do not match"):
        Replies("m", ("a",), ("x",), 40, 8, "p", ())


def test_training_replies_go_to_the_reply_cache_and_come_back(tiny_model, tokenizer, tmp_path):
    from safeguard.lab.training import generate_replies

    cache = ReplyCache(tmp_path)
    prompts = ["how are you?", "hi", "how are you?"]
    first = generate_replies(tiny_model, tokenizer, prompts, max_new_tokens=3, batch_size=2, cache=cache, model_name="tiny", progress=False)
    assert first[0] == first[2] and tokenizer.padding_side == "left"
    (path,) = tmp_path.glob("unsteered-*.json")
    data = json.loads(path.read_text())
    assert data["prompts"] == ["hi", "how are you?"] and (data["model"], data["max_new_tokens"], data["batch_size"]) == ("tiny", 3, 2)

    def boom(*a, **k):
        raise AssertionError("generated again")

    tiny_model.generate = boom
    assert generate_replies(tiny_model, tokenizer, prompts, max_new_tokens=3, cache=cache, model_name="tiny", progress=False) == first
    assert compliance_replies(SimpleNamespace(model_name="tiny"), ["hi"], max_new_tokens=3, cache=cache) == [first[1]]
    with pytest.raises(Exception, match="model_name"):
        generate_replies(tiny_model, tokenizer, prompts, cache=cache, progress=False)
