"""Refusal openers (runtime/openers.py): the pack's opener is forced as exactly its tokens at the start of refusing
rows, other rows are bit-for-bit untouched, streams yield it first, policies can turn it off, packs validate it."""

from __future__ import annotations

import pytest
import yaml
from _tiny import hooks_on, policy_v2, write_tiny_pack

from safeguard import Policy, SteeredLLM
from safeguard.errors import PolicyError
from safeguard.runtime.models import LoadedModel
from safeguard.runtime.openers import MAX_OPENER, check_opener, opener_tokens
from safeguard.runtime.pack import Pack

OPENER = "I'm sorry, but I can't help with that."
KW = {"max_new_tokens": 14}


def pack_with(folder, opener=OPENER, **refusal):
    path = write_tiny_pack(folder)
    data = yaml.safe_load(path.read_text())
    data["refusal"] = {"steer": data["refusal"], **({"opener": opener} if opener is not None else {}), **refusal}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def llm_with(pack_path, tiny_model, tokenizer, saes) -> SteeredLLM:
    loaded = LoadedModel(model=tiny_model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    return SteeredLLM(loaded, saes, None, pack=pack_path)


@pytest.fixture
def opened(tiny_model, tokenizer, saes, tmp_path):
    return llm_with(pack_with(tmp_path / "opened"), tiny_model, tokenizer, saes)


@pytest.fixture
def plain(tiny_model, tokenizer, saes, tmp_path):
    """The same model and SAEs with the same pack, less the opener."""
    return llm_with(write_tiny_pack(tmp_path / "plain"), tiny_model, tokenizer, saes)


def pol(defaults=None, **cats) -> Policy:
    return Policy.from_dict({**policy_v2(**cats), **({"defaults": defaults} if defaults else {})})


REFUSE = {"cyber": {}, "fraud": {}}                     # cyber fires on every prompt at standard
NEVER = {"cyber": {"sensitivity": "relaxed"}}           # relaxed: nothing fires


def generated_ids(llm, monkeypatch):
    """Record each row's generated token ids as the engine hands them to ``_row_result``."""
    seen: dict[int, list[int]] = {}
    original = llm._row_result

    def spy(prompt, run, row, gen, *args, **kwargs):
        seen[row] = list(gen)
        return original(prompt, run, row, gen, *args, **kwargs)

    monkeypatch.setattr(llm, "_row_result", spy)
    return seen


def test_forced_tokens_are_exactly_the_openers_continuation_tokens(opened, tokenizer, monkeypatch):
    head = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True)
    h = tokenizer(head, add_special_tokens=False)["input_ids"]
    expected = tokenizer(head + OPENER, add_special_tokens=False)["input_ids"][len(h):]
    assert list(opener_tokens(tokenizer, OPENER)) == expected and tokenizer.decode(expected) == OPENER
    seen = generated_ids(opened, monkeypatch)
    r = opened.generate("hello there", policy=pol(**REFUSE), **KW)
    assert seen[0][:len(expected)] == expected
    assert r.text.startswith(OPENER) and r.report.action == "refuse" and r.report.opener is True
    assert r.report.to_dict()["opener"] is True and r.report.applied  # the steering still applies
    short = opened.generate("hello there", policy=pol(**REFUSE), max_new_tokens=3)
    assert short.completion_tokens == 3 and OPENER.startswith(short.text) and short.report.opener


def test_rows_that_do_not_refuse_are_untouched(opened, plain, monkeypatch):
    prompts = ["hello there", "what is two plus two", "tell me a story"]
    policies = [pol(**REFUSE), pol(**NEVER), pol(cyber={"response": "redirect"})]
    seen = generated_ids(opened, monkeypatch)
    rows = opened.batch(prompts, policies=policies, **KW)
    with_opener = dict(seen)
    seen_plain = generated_ids(plain, monkeypatch)
    base = plain.batch(prompts, policies=policies, **KW)
    assert rows[0].text.startswith(OPENER) and not base[0].text.startswith(OPENER)
    for i in (1, 2):  # not refusing (nothing fired; redirected): the same tokens as without the feature
        assert with_opener[i] == seen_plain[i] and rows[i].text == base[i].text and not rows[i].report.opener
    assert rows[2].report.action == "redirect"
    assert opened.generate(prompts[1], policy=pol(**REFUSE), steer=False, **KW).text == plain.generate(prompts[1], steer=False, **KW).text
    mon = Policy.from_dict({**policy_v2(**REFUSE), "mode": "monitor"})
    assert opened.generate(prompts[0], policy=mon, **KW).text == plain.generate(prompts[0], policy=mon, **KW).text


def test_a_refusing_row_continues_under_its_steering(opened, tokenizer, monkeypatch):
    """After the forced tokens the model decodes freely: the continuation is the model's own greedy choice."""
    seen = generated_ids(opened, monkeypatch)
    opened.generate("hello there", policy=pol(**REFUSE), max_new_tokens=20)
    n = len(opener_tokens(tokenizer, OPENER))
    assert len(seen[0]) > n  # decoding went on past the opener (the tiny random model rarely ends a turn)


def test_stream_yields_the_opener_first(opened):
    s = opened.stream("hello there", policy=pol(**REFUSE), **KW)
    pieces = list(s)
    assert pieces and OPENER.startswith(pieces[0]) and "".join(pieces).startswith(OPENER)
    assert s.result.text == "".join(pieces) and s.result.report.opener
    assert hooks_on(opened.model) == 0


def test_a_policy_turns_the_opener_off(opened, plain):
    ref = plain.generate("hello there", policy=pol(**REFUSE), **KW)
    off = pol({"opener": False}, **REFUSE)
    r = opened.generate("hello there", policy=off, **KW)
    assert r.text == ref.text and not r.report.opener and r.report.action == "refuse"
    per_cat = pol(cyber={"opener": False}, fraud={})
    assert opened.generate("hello there", policy=per_cat, **KW).text == ref.text
    on_again = pol({"opener": False}, cyber={"opener": True}, fraud={})
    assert opened.generate("hello there", policy=on_again, **KW).text.startswith(OPENER)
    # the switch is part of every hash: the policy's, and the compiled one
    assert len({opened.compile_policy(p).hash for p in (pol(**REFUSE), off, per_cat)}) == 3
    assert pol(**REFUSE).content_hash == Policy.from_dict({**policy_v2(**REFUSE), "defaults": {"opener": True}}).content_hash
    with pytest.raises(PolicyError, match=r"defaults.opener"):
        pol({"opener": "yes please"}, **REFUSE)


def test_block_outranks_the_opener(opened):
    r = opened.generate("hello there", policy=pol(cyber={"response": "block"}), **KW)
    assert r.report.blocked and not r.report.opener and not r.text.startswith(OPENER)


def test_the_opener_is_in_the_packs_hash_and_the_list_form_hashes_as_before(tmp_path):
    listed = Pack.load(write_tiny_pack(tmp_path / "a"))
    mapped = Pack.load(pack_with(tmp_path / "b", opener=None))
    opened = Pack.load(pack_with(tmp_path / "c"))
    assert listed.refusal.opener is None and listed.refusal.steer == mapped.refusal.steer
    assert listed.content_hash == mapped.content_hash != opened.content_hash
    assert opened.refusal.opener == OPENER


@pytest.mark.parametrize(("opener", "message"), [
    ("", "the opener is empty"),
    ("   ", "the opener is empty"),
    ("x" * (MAX_OPENER + 1), f"at most {MAX_OPENER}"),
    ("I'm sorry.\nNo.", "line break"),
    (" I'm sorry.", "whitespace"),
    (42, "valid string"),
])
def test_pack_opener_validation_names_the_field(tmp_path, opener, message):
    with pytest.raises(PolicyError, match=r"refusal\.opener") as err:
        Pack.load(pack_with(tmp_path / "bad", opener=opener))
    assert message in str(err.value)


def test_the_refusal_section_refuses_unknown_keys_and_needs_steer(tmp_path):
    with pytest.raises(PolicyError, match=r"refusal\.openr: unknown field"):
        Pack.load(pack_with(tmp_path / "a", openr="x"))
    path = write_tiny_pack(tmp_path / "b")
    data = yaml.safe_load(path.read_text())
    data["refusal"] = {"opener": OPENER}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match=r"refusal\.steer: field required"):
        Pack.load(path)


def test_check_opener_accepts_the_shipped_style():
    assert check_opener(OPENER) == OPENER
    assert check_opener("x" * MAX_OPENER)


def test_a_pack_may_refuse_with_a_dense_vector_and_its_bytes_are_hashed(tiny_model, tokenizer, saes, tmp_path):
    """A pack's refusal may be a dense vector (the dense refusal direction) in its vector file: it steers exactly as
    the same vector given as a policy's explicit steer block, and changing its bytes changes the pack hash."""
    import torch
    from safetensors.torch import load_file, save_file

    path = write_tiny_pack(tmp_path / "dense")
    vec_file = path.parent / "pack.vectors.safetensors"
    vectors = load_file(str(vec_file))
    vectors["_refusal_direction"] = torch.randn(vectors["cyber"].shape, generator=torch.Generator().manual_seed(3))
    save_file(vectors, str(vec_file))
    action = {"kind": "vector", "layer": 2, "file": "pack.vectors.safetensors", "key": "_refusal_direction", "strength": 3.0, "positions": "both"}
    data = yaml.safe_load(path.read_text())
    data["refusal"] = {"steer": [action]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    llm = llm_with(path, tiny_model, tokenizer, saes)
    from_pack = llm.generate("hello there", policy=Policy.from_dict(policy_v2(cyber={"response": "refuse"}, fraud={"response": "off"})), **KW)
    assert list(from_pack.report.fired) == ["cyber"] and from_pack.report.action == "refuse"
    explicit = {**policy_v2(cyber={"response": "refuse", "steer": [action]}, fraud={"response": "off"}), "model": "tiny-llama", "sae": "tiny-sae"}
    (tmp_path / "explicit").mkdir()
    save_file(vectors, str(tmp_path / "explicit" / "pack.vectors.safetensors"))
    (tmp_path / "explicit" / "p.yaml").write_text(yaml.safe_dump(explicit))
    by_policy = llm.generate("hello there", policy=Policy.load(tmp_path / "explicit" / "p.yaml"), **KW)
    unsteered = llm.generate("hello there", steer=False, **KW)
    assert from_pack.text == by_policy.text != unsteered.text
    before = Pack.load(path).content_hash
    vectors["_refusal_direction"] = vectors["_refusal_direction"] * 2
    save_file(vectors, str(vec_file))
    assert Pack.model_validate({**data, "base_dir": str(path.parent)}).content_hash != before


def test_after_opener_end_makes_the_reply_the_opener_alone(tiny_model, tokenizer, saes, tmp_path):
    """``after_opener: end``: a refusing row's reply is exactly the opener, ended as a turn ends (finish_reason stop,
    the end-of-turn token right after the opener's tokens); a row nothing fires on in the same batch is bit-for-bit its
    reply without the feature; a stream yields the same text."""
    ending = llm_with(pack_with(tmp_path / "end", after_opener="end"), tiny_model, tokenizer, saes)
    steering = llm_with(pack_with(tmp_path / "steer"), tiny_model, tokenizer, saes)
    policies = [pol(**REFUSE), pol(**NEVER)]
    rows = ending.batch(["hello there", "what is two plus two"], policies=policies, **KW)
    base = steering.batch(["hello there", "what is two plus two"], policies=policies, **KW)
    assert rows[0].text == OPENER and rows[0].finish_reason == "stop" and rows[0].report.opener
    assert rows[0].completion_tokens == len(opener_tokens(tokenizer, OPENER))  # the end of turn is not counted
    assert base[0].text.startswith(OPENER) and len(base[0].text) > len(OPENER)  # the steered continuation the end cuts
    assert rows[1].text == base[1].text and not rows[1].report.opener and rows[1].report.action == "none"
    s = ending.stream("hello there", policy=pol(**REFUSE), **KW)
    assert "".join(s) == OPENER and s.result.finish_reason == "stop"
    off = ending.generate("hello there", policy=pol({"opener": False}, **REFUSE), **KW)
    assert off.text == steering.generate("hello there", policy=pol({"opener": False}, **REFUSE), **KW).text  # no opener: steered as before


def test_after_opener_is_validated_and_hashed(tmp_path):
    steer = Pack.load(pack_with(tmp_path / "a"))
    explicit = Pack.load(pack_with(tmp_path / "b", after_opener="steer"))
    end = Pack.load(pack_with(tmp_path / "c", after_opener="end"))
    assert steer.content_hash == explicit.content_hash != end.content_hash  # the default hashes as before the field
    with pytest.raises(PolicyError, match=r"refusal\.after_opener"):
        Pack.load(pack_with(tmp_path / "d", after_opener="stop"))
    with pytest.raises(PolicyError, match=r"after_opener: end needs an opener"):
        Pack.load(pack_with(tmp_path / "e", opener=None, after_opener="end"))
