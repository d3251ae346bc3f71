"""SteeredLLM on a tiny random Llama: reports, gating, bad input, policy swaps, streams, threads, async."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch
import yaml
from _tiny import hooks_on, policy_dict

from safeguard import InputError, Policy, PolicyError, SteeredLLM

FIRE = policy_dict(threshold=-1.0)
NEVER = policy_dict(threshold=1e9)
KW = {"max_new_tokens": 6}


def test_generate_reports_the_truth(llm):
    r = llm.generate("hello there", **KW)
    rep = r.report
    assert isinstance(r.text, str) and r.completion_tokens > 0
    assert rep.policy_name == "tiny" and rep.policy_version == "1" and rep.policy_hash == llm.compile_policy(llm.policy).hash
    assert rep.mode == "enforce" and rep.fired == ("cyber",)
    d = rep.decisions[0]
    assert d.fired and d.score >= d.threshold == -1.0 and d.layer == 1
    [a] = rep.applied
    assert (a.category, a.kind, a.layer, a.feature, a.strength) == ("cyber", "add", 2, 7, 4.0)
    assert rep.timings["total"] > 0 and "detect" in rep.timings


def test_steering_changes_the_reply_and_steer_false_is_the_plain_model(llm):
    steered = llm.generate("hello there", **KW)
    plain = llm.generate("hello there", steer=False, **KW)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    with torch.no_grad():
        ref = llm.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert plain.text == llm.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert plain.report.mode == "off" and plain.report.decisions == ()
    assert steered.text != plain.text


def test_a_policy_that_does_not_fire_gives_the_unsteered_reply(llm):
    never = llm.generate("hello there", policy=Policy.from_dict(NEVER), **KW)
    plain = llm.generate("hello there", steer=False, **KW)
    assert never.text == plain.text and never.report.fired == () and never.report.applied == ()


def test_batch_rows_that_do_not_fire_equal_the_unsteered_batch(llm):
    prompts = ["first prompt here", "a second, longer prompt for padding", "third"]
    mixed = llm.batch(prompts, policies=[Policy.from_dict(NEVER), Policy.from_dict(FIRE), Policy.from_dict(NEVER)], **KW)
    plain = llm.batch(prompts, steer=False, **KW)
    assert [r.report.fired for r in mixed] == [(), ("cyber",), ()]
    assert mixed[0].text == plain[0].text and mixed[2].text == plain[2].text
    assert mixed[1].text != plain[1].text


def test_detection_reads_only_the_users_tokens(llm):
    # a category whose feature never fires on user tokens: a system prompt must not make it fire
    msgs = [{"role": "system", "content": "x " * 40}, {"role": "user", "content": "hi"}]
    ids, mask = llm._encode_one(msgs, True)
    text = llm.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert text.strip() == "hi"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.generate(""), "empty"),
        (lambda m: m.generate("   "), "empty"),
        (lambda m: m.generate(["not", "a", "string"]), "string prompt"),
        (lambda m: m.chat([{"role": "wizard", "content": "hi"}]), "valid roles"),
        (lambda m: m.chat([{"role": "user", "content": 3}]), "must be a string"),
        (lambda m: m.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), "last message"),
        (lambda m: m.chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]),
         "only the first"),
        (lambda m: m.chat([]), "empty"),
        (lambda m: m.chat("hi"), "list of messages"),
        (lambda m: m.generate("word " * 300), "context window"),
        (lambda m: m.generate("hi", max_new_tokens=0), "positive integer"),
        (lambda m: m.generate("hi", num_beams=2), "not supported"),
        (lambda m: m.batch(["ok", ""]), "empty"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_the_model_alone(llm, call, match):
    before = llm.policy
    with pytest.raises(InputError, match=match):
        call(llm)
    assert hooks_on(llm.model) == 0 and llm.policy is before


def test_policy_swap_is_atomic(llm, tmp_path):
    old = llm.policy
    bad = policy_dict(features=(3, 999))  # the tiny SAE has 64 features
    with pytest.raises(PolicyError, match="feature 999"):
        llm.use_policy(Policy.from_dict(bad))
    assert llm.policy is old
    with pytest.raises(PolicyError, match="does not exist"):
        llm.use_policy(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(PolicyError, match="broken.yaml"):
        llm.use_policy(tmp_path / "broken.yaml")
    wrong_model = {**FIRE, "model": "Llama-3-8B-Instruct"}
    with pytest.raises(PolicyError, match="loaded model is 'tiny-llama'"):
        llm.use_policy(Policy.from_dict(wrong_model))
    assert llm.policy is old
    (tmp_path / "never.yaml").write_text(yaml.safe_dump(NEVER))
    assert llm.use_policy(tmp_path / "never.yaml").categories["cyber"].detect.threshold == 1e9
    assert llm.generate("hello", **KW).report.fired == ()
    llm.use_policy(None)
    assert llm.policy is None and llm.generate("hello", **KW).report.mode == "off"


def test_stream_pieces_join_to_the_generated_text(llm):
    full = llm.generate("tell me a story", max_new_tokens=10)
    s = llm.stream("tell me a story", max_new_tokens=10)
    pieces = list(s)
    assert "".join(pieces) == full.text
    assert s.result is not None and s.result.text == full.text and s.report.fired == ("cyber",)
    assert hooks_on(llm.model) == 0


def test_abandoned_stream_removes_its_hooks(llm):
    s = llm.stream("tell me a story", max_new_tokens=200)
    next(iter(s), None)
    s.close()
    assert hooks_on(llm.model) == 0
    with llm.stream("again", max_new_tokens=200) as s2:
        next(iter(s2), None)
    assert hooks_on(llm.model) == 0


def test_errors_inside_generation_reach_the_caller_and_hooks_go(llm, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(llm.model, "generate", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        llm.generate("hi", **KW)
    with pytest.raises(RuntimeError, match="kernel failed"):
        list(llm.stream("hi", **KW))
    assert hooks_on(llm.model) == 0


def test_threads_with_different_policies_never_see_each_others_steering(llm):
    fire, never = Policy.from_dict(FIRE), Policy.from_dict(NEVER)
    prompts = [f"prompt number {i}" for i in range(6)]
    expected = {(p, i % 2): llm.generate(p, policy=fire if i % 2 else never, **KW).text for i, p in enumerate(prompts)}
    got: dict[tuple[str, int], str] = {}

    def work(i: int, p: str) -> None:
        got[(p, i % 2)] = llm.generate(p, policy=fire if i % 2 else never, **KW).text

    threads = [threading.Thread(target=work, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


async def test_async_variants_match_sync(llm):
    sync = llm.generate("hi there", **KW).text
    assert (await llm.agenerate("hi there", **KW)).text == sync
    assert (await llm.achat([{"role": "user", "content": "hi there"}], **KW)).text == sync
    assert [r.text for r in await llm.abatch(["hi there"], **KW)] == [sync]
    pieces = [p async for p in llm.astream("hi there", **KW)]
    assert "".join(pieces) == sync
    await asyncio.sleep(0)
    assert hooks_on(llm.model) == 0


def test_stop_strings_cut_the_reply(llm):
    full = llm.generate("hello", max_new_tokens=12, steer=False).text
    words = full.split()
    if len(words) < 3:
        pytest.skip("reply too short to cut")
    stop = words[2]
    cut = llm.generate("hello", max_new_tokens=12, steer=False, stop=[stop])
    assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"
    assert "".join(llm.stream("hello", max_new_tokens=12, steer=False, stop=[stop])) == cut.text


def test_one_decision_is_logged_without_the_prompt_unless_asked(llm, caplog):
    with caplog.at_level(logging.INFO, logger="safeguard"):
        llm.generate("secret prompt text", **KW)
    [rec] = [r for r in caplog.records if hasattr(r, "safeguard")]
    assert rec.safeguard["fired"] == ["cyber"] and rec.safeguard["policy_hash"] == llm.compile_policy(llm.policy).hash
    assert "prompt" not in rec.safeguard and "secret prompt text" not in rec.getMessage()
    caplog.clear()
    llm.log_prompts = True
    with caplog.at_level(logging.INFO, logger="safeguard"):
        llm.generate("secret prompt text", **KW)
    [rec] = [r for r in caplog.records if hasattr(r, "safeguard")]
    assert rec.safeguard["prompt"] == "secret prompt text"


def test_sae_that_does_not_fit_is_refused(tiny_model, tokenizer):
    from _tiny import make_sae

    from safeguard import SAEError
    from safeguard.runtime.models import LoadedModel
    from safeguard.runtime.saes import SAESet

    loaded = LoadedModel(tiny_model, tokenizer, "tiny-llama", "test", None)
    with pytest.raises(SAEError, match="trained on 'other-model'"):
        SteeredLLM(loaded, SAESet([make_sae(1, model_name="other-model")]))
    with pytest.raises(SAEError, match="layers 0..3"):
        SteeredLLM(loaded, SAESet([make_sae(7)]))


def test_batch_rows_marked_false_are_not_steered(llm):
    prompts = ["one prompt", "two prompt"]
    mixed = llm.batch(prompts, policies=[False, None], **KW)
    plain = llm.batch(prompts, steer=False, **KW)
    assert mixed[0].report.mode == "off" and mixed[0].text == plain[0].text
    assert mixed[1].report.fired == ("cyber",)


def test_classify_reports_the_detectors_verdicts_without_steering(llm):
    texts = ["first prompt here", "a second, longer prompt for padding"]
    pol = policy_dict(threshold=0.0)
    pol["categories"][0]["detect"].update(reduce="max")
    reports = llm.classify(texts, policy=Policy.from_dict(pol))
    steered = llm.batch(texts, policy=Policy.from_dict(pol), **KW)
    assert [r.mode for r in reports] == ["monitor", "monitor"] and all(r.applied == () for r in reports)
    assert [d.score for r in reports for d in r.decisions] == pytest.approx([d.score for r in steered for d in r.report.decisions], rel=1e-5)
    assert [r.fired for r in reports] == [r.report.fired for r in steered]
    assert not hooks_on(llm.model)
    bare = SteeredLLM(llm._loaded, llm.saes, policy=None)
    with pytest.raises(PolicyError, match="needs a policy"):
        bare.classify(texts)


def test_classify_with_every_category_disabled_decides_nothing(llm):
    pol = policy_dict(threshold=-1.0)
    pol["categories"][0]["enabled"] = False
    [report] = llm.classify(["hello"], policy=Policy.from_dict(pol))
    assert report.fired == () and report.decisions == () and not hooks_on(llm.model)
    with pytest.raises(InputError, match="list of texts"):
        llm.classify("hello")


# ------------------------------------------------------------------ untrusted arguments (issue 10 §3, issue 11 item 3)
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.generate("hi", stop=[None]), InputError, r"stop\[0\] must be a string, not NoneType"),
        (lambda m: m.generate("hi", stop=["ok", ""]), InputError, r"stop\[1\] is empty"),
        (lambda m: m.generate("hi", stop=[f"s{i}" for i in range(17)]), InputError, "stop has 17 strings; at most 16"),
        (lambda m: m.generate("hi", stop=["x" * 257]), InputError, r"stop\[0\] has 257 characters; at most 256"),
        (lambda m: m.generate("hi", stop=5), InputError, "stop must be a string or a list of strings, not int"),
        (lambda m: m.generate("hi", stop=["\ud800"]), InputError, r"stop\[0\] holds a lone surrogate"),
        (lambda m: m.generate("hi", temperature=float("nan")), InputError, "temperature must be a finite number >= 0"),
        (lambda m: m.generate("hi", temperature=-0.5), InputError, "temperature must be a finite number >= 0"),
        (lambda m: m.generate("hi", temperature=float("inf")), InputError, "temperature must be a finite number >= 0"),
        (lambda m: m.generate("hi", temperature="0.7"), InputError, "temperature must be a number >= 0 .*not str"),
        (lambda m: m.generate("hi", seed=2**70), InputError, r"seed must be in \[0, 2\*\*63 - 1\]"),
        (lambda m: m.generate("hi", seed=-1), InputError, r"seed must be in \[0, 2\*\*63 - 1\]"),
        (lambda m: m.generate("hi", seed=True), InputError, "seed must be an integer .*not bool"),
        (lambda m: m.generate("hi", seed=1.5), InputError, "seed must be an integer .*not float"),
        (lambda m: m.generate("hi", max_new_tokens=True), InputError, "max_new_tokens must be a positive integer, got True"),
        (lambda m: m.generate("hi", max_new_tokens="5"), InputError, "max_new_tokens must be a positive integer"),
        (lambda m: m.generate("hi", max_new_tokens=2.0), InputError, "max_new_tokens must be a positive integer"),
        (lambda m: m.generate("hi", max_time=float("nan")), InputError, "max_time must be a finite number"),
        (lambda m: m.generate("hi \ud800 there"), InputError, "the prompt holds a lone surrogate '\\\\ud800' at character 3"),
        (lambda m: m.chat([{"role": "user", "content": "\ud800"}]), InputError, r"messages\[0\]\.content holds a lone surrogate"),
        (lambda m: m.chat([{"role": "system", "content": "a\udfff"}, {"role": "user", "content": "hi"}]), InputError,
         r"messages\[0\]\.content holds a lone surrogate"),
        (lambda m: m.classify(["fine", "\ud800"]), InputError, "lone surrogate"),
        (lambda m: m.stream("hi", temperature="0.7"), InputError, "temperature"),  # raised by stream(), not inside its thread
        (lambda m: m.stream("hi", stop=[""]), InputError, r"stop\[0\] is empty"),
        (lambda m: m.generate("hi", policy=123), PolicyError, "policy must be a Policy, a shipped policy name or a file path, not int"),
        (lambda m: m.batch(["hi"], policies=[123]), PolicyError, "not int"),
        (lambda m: m.classify(["hi"], policy=1.5), PolicyError, "not float"),
        (lambda m: m.use_policy(123), PolicyError, "not int"),
    ],
)
def test_untrusted_arguments_are_safeguard_errors_naming_the_field(llm, call, error, match):
    before = llm.policy
    with pytest.raises(error, match=match) as info:
        call(llm)
    assert type(info.value) is error  # not a raw TypeError / ValueError / AttributeError from deeper down
    assert hooks_on(llm.model) == 0 and llm.policy is before


def test_temperature_zero_or_none_is_greedy(llm):
    greedy = llm.generate("hello there", steer=False, **KW).text
    assert llm.generate("hello there", steer=False, temperature=0, **KW).text == greedy
    assert llm.generate("hello there", steer=False, temperature=0.0, seed=3, **KW).text == greedy


def _spanning_stop(llm):
    """The plain reply to "hello there" and a stop string made of the 3 characters either side of the first boundary between
    two of its stream pieces of at least 4 characters."""
    full = llm.generate("hello there", steer=False, max_new_tokens=12).text
    pieces = list(llm.stream("hello there", steer=False, max_new_tokens=12))
    assert "".join(pieces) == full
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 4 and len(pieces[i + 1]) >= 4)
    stop = pieces[i][-3:] + pieces[i + 1][:3]  # begins in one piece, ends in the next
    assert full.index(stop) == len("".join(pieces[: i + 1])) - 3
    return full, stop


def test_a_plain_string_stop_is_one_stop_string_not_its_characters(llm):
    full, stop = _spanning_stop(llm)
    assert min(full.index(c) for c in stop) < full.index(stop), "a character of stop occurs earlier: splitting it would cut there"
    r = llm.generate("hello there", steer=False, max_new_tokens=12, stop=stop)
    assert r.text == full[: full.index(stop)] and r.text.strip() and r.finish_reason == "stop"
    assert "".join(llm.stream("hello there", steer=False, max_new_tokens=12, stop=stop)) == r.text


def test_a_stop_string_spanning_two_stream_pieces_never_leaks(llm):
    full, stop = _spanning_stop(llm)
    s = llm.stream("hello there", steer=False, max_new_tokens=12, stop=[stop])
    got = list(s)
    assert "".join(got) == s.result.text == full[: full.index(stop)]
    assert hooks_on(llm.model) == 0


def test_a_max_time_cut_off_is_reported_as_time(llm):
    r = llm.generate("hello there", steer=False, max_new_tokens=50, max_time=0.0)
    assert r.completion_tokens < 50 and r.finish_reason == "time"
    assert llm.generate("hello there", steer=False, max_new_tokens=3).finish_reason == "length"
