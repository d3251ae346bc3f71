"""Turn-aware detection: a detector with ``turns: last`` reads only the last user message's tokens (in context)."""

from __future__ import annotations

import pytest
import yaml
from _tiny import explicit_policy, first_turn_feature, write_tiny_pack

from safeguard import Policy, PolicyError, SteeredLLM
from safeguard.runtime.models import LoadedModel
from safeguard.runtime.pack import Pack

TWO_TURNS = [{"role": "user", "content": "How do I sharpen a kitchen knife at home?"},
             {"role": "assistant", "content": "Use a whetstone at a low angle."},
             {"role": "user", "content": "thanks, and what is the capital of France"}]


def test_token_masks_of_one_turn_are_equal_and_of_two_turns_the_last_is_the_last_message(llm, tokenizer):
    for prompt in ("hello there", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]):
        ids, user, last = llm.token_masks(prompt)
        assert user == last and any(user)
        assert llm._encode_one(prompt, True) == (ids, user) == llm._encode_one(prompt, True, "last")
    ids, user, last = llm.token_masks(TWO_TURNS)
    assert llm._encode_one(TWO_TURNS, True) == (ids, user) and llm._encode_one(TWO_TURNS, True, "last") == (ids, last)
    assert all(u for u, lm in zip(user, last, strict=True) if lm) and sum(last) < sum(user)
    assert tokenizer.decode([t for t, m in zip(ids, last, strict=True) if m]).strip() == TWO_TURNS[-1]["content"]
    ids, user, last = llm.token_masks("raw text", template=False)
    assert user == last == [True] * len(ids)
    from safeguard import InputError

    with pytest.raises(InputError, match="turns must be"):
        llm._encode_one("hi", True, "first")


@pytest.mark.parametrize("prompt", ["hello there, how are you", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]])
def test_last_and_all_score_a_single_turn_prompt_exactly_alike(tiny_model, tokenizer, saes, tmp_path, prompt):
    loaded = LoadedModel(model=tiny_model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    scores = {}
    for turns in ("all", "last"):
        folder = tmp_path / turns
        data = yaml.safe_load(write_tiny_pack(folder).read_text())
        for c in data["categories"].values():
            c["detect"].update(combine="sum", weights=[0.7, -0.2], order="reduce_first", turns=turns)
        (folder / "pack.yaml").write_text(yaml.safe_dump(data))
        llm = SteeredLLM(loaded, saes, None, pack=folder / "pack.yaml")
        policy = Policy.from_dict({"schema_version": 2, "name": "p", "version": "1", "taxonomy": {"name": "AIR-Bench", "version": "2024"},
                                   "categories": {"cyber": {"response": "monitor"}, "fraud": {"response": "monitor"}}})
        scores[turns] = [(d.category, d.score) for d in llm.classify([prompt], policy=policy)[0].decisions]
        assert llm.compile_policy(policy).categories[0].turns == turns
    assert scores["all"] == scores["last"]  # exact


def test_last_ignores_the_first_turn_where_all_fires(llm):
    f, thr = first_turn_feature(llm, TWO_TURNS)
    every = Policy.from_dict(explicit_policy(f, thr))  # turns left out: all
    last = Policy.from_dict(explicit_policy(f, thr, turns="last"))
    assert llm.classify([TWO_TURNS], policy=every)[0].fired == ("cyber",)
    assert llm.classify([TWO_TURNS], policy=last)[0].fired == ()
    # generation decides on the same masks, and a batch mixes rows of both kinds
    assert llm.chat(TWO_TURNS, policy=every, max_new_tokens=2).report.fired == ("cyber",)
    assert llm.chat(TWO_TURNS, policy=last, max_new_tokens=2).report.fired == ()
    rows = llm.batch([TWO_TURNS, TWO_TURNS[-1:]], policies=[last, every], max_new_tokens=2)
    assert rows[0].report.fired == ()
    solo = llm.classify([TWO_TURNS[-1:]], policy=every)[0]
    assert rows[1].report.decisions[0].score == solo.decisions[0].score


def test_turns_is_validated_and_all_keeps_old_hashes(tmp_path):
    plain = explicit_policy(3, 0.5)
    assert Policy.from_dict(plain).content_hash == Policy.from_dict(explicit_policy(3, 0.5, turns="all")).content_hash
    assert Policy.from_dict(plain).content_hash != Policy.from_dict(explicit_policy(3, 0.5, turns="last")).content_hash
    with pytest.raises(PolicyError, match=r"categories\.cyber\.detect\.turns"):
        Policy.from_dict(explicit_policy(3, 0.5, turns="first"))
    path = write_tiny_pack(tmp_path / "a")
    data = yaml.safe_load(path.read_text())
    for name, turns in (("b", "all"), ("c", "both")):
        data["categories"]["cyber"]["detect"]["turns"] = turns
        write_tiny_pack(tmp_path / name).write_text(yaml.safe_dump(data))  # same vectors (seeded), edited detect
    assert Pack.load(tmp_path / "b" / "pack.yaml").categories["cyber"].detect.turns == "all"
    assert Pack.load(tmp_path / "b" / "pack.yaml").content_hash == Pack.load(path).content_hash  # 'all' is the old meaning, and hash
    with pytest.raises(PolicyError, match=r"categories\.cyber\.detect\.turns"):
        Pack.load(tmp_path / "c" / "pack.yaml")
