"""Detection while the reply is generated: a category with a pack ``reply`` threshold scores the generated tokens
(running max) and, when it fires at token t, gets its response from token t + 1 on. Rows where nothing fires are
bit-for-bit the unsteered model."""

from __future__ import annotations

import threading

import pytest
import torch
import yaml
from _tiny import hooks_on, policy_v2, write_tiny_pack

from safeguard import Policy, PolicyError, SteeredLLM
from safeguard.runtime.models import LoadedModel
from safeguard.runtime.steering import RunState, steering

N = 10
PROMPT = "hello there"
OTHER = "what is two plus two"
BLOCK = "Blocked in the reply."


def reply_pack(folder, *, feature: int, threshold: float, **detect):
    path = write_tiny_pack(folder)
    data = yaml.safe_load(path.read_text())
    for c in data["categories"].values():
        c["detect"].update(features=[feature], **{k: list(v) if isinstance(v, list) else v for k, v in detect.items()})
    data["categories"]["cyber"]["reply"] = {"threshold": threshold}
    path.write_text(yaml.safe_dump(data))
    return path


def pol(response: str = "refuse", **rule) -> Policy:
    """Cyber never fires at the prompt (relaxed: 1e9); it may in the reply."""
    return Policy.from_dict({**policy_v2(cyber={"response": response, "sensitivity": "relaxed", **rule}, fraud={"response": "off"}),
                             "defaults": {"message": BLOCK}})


def unsteered_ids(llm, prompts, n=N):
    ids, attn, *_ = llm._encode(prompts, True, n)
    with torch.no_grad():
        out = llm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[:, ids.shape[1]:]


def engine_ids(llm, prompts, policies, n=N):
    """Generated ids through the engine's hooks (no stopping criteria: every row runs n tokens), and the run."""
    ids, attn, user, last = llm._encode(prompts, True, n)
    run = RunState([llm.compile_policy(p) if p is not None else None for p in policies], user, attn, last_turn_mask=last)
    with torch.no_grad(), steering(llm.model, run):
        out = llm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[:, ids.shape[1]:], run


@pytest.fixture
def found(tiny_model, tokenizer, saes):
    """A layer-1 feature whose running max over PROMPT's unsteered reply jumps at a token t (1 <= t <= N - 4), and a
    reply threshold between the running max before and at t: a detector on it fires at exactly token t."""
    loaded = LoadedModel(model=tiny_model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    llm = SteeredLLM(loaded, saes, None)
    ids, *_ = llm._encode([PROMPT], True, N)
    gen = unsteered_ids(llm, [PROMPT])
    with torch.no_grad():
        h = tiny_model(input_ids=torch.cat([ids, gen], 1), output_hidden_states=True).hidden_states[2][0]
        acts = saes[1].sae.encode(h)[ids.shape[1]:ids.shape[1] + N - 1]  # the generated tokens whose representation is computed
    running = acts.cummax(0).values  # (N - 1, d_sae)
    for t in range(1, N - 3):
        jump = running[t] - running[t - 1]
        f = int(jump.argmax())
        if jump[f] > 0.05:
            return loaded, f, float((running[t - 1, f] + running[t, f]) / 2), t
    pytest.skip("no feature jumps in this tiny model's reply")


def packed(found, folder, *, threshold=None, **detect):
    loaded, f, thr, _ = found
    return SteeredLLM(loaded, _saes(loaded), None, pack=reply_pack(folder, feature=f, threshold=thr if threshold is None else threshold, **detect))


_SAES: dict[int, object] = {}


@pytest.fixture(autouse=True)
def _keep_saes(saes, tiny_model):
    _SAES[id(tiny_model)] = saes
    yield
    _SAES.clear()


def _saes(loaded):
    return _SAES[id(loaded.model)]


def test_rows_where_nothing_fires_are_bit_identical_to_the_unsteered_model(found, tmp_path):
    llm = packed(found, tmp_path / "p", threshold=1e9)
    ids, attn, *_ = llm._encode([PROMPT, OTHER], True, N)
    with torch.no_grad():
        plain = llm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=N, do_sample=False, pad_token_id=2,
                                   output_scores=True, return_dict_in_generate=True)
    _, attn, user, last = llm._encode([PROMPT, OTHER], True, N)
    run = RunState([llm.compile_policy(pol())] * 2, user, attn, last_turn_mask=last)
    with torch.no_grad(), steering(llm.model, run):
        watched = llm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=N, do_sample=False, pad_token_id=2,
                                     output_scores=True, return_dict_in_generate=True)
    assert run._watch  # the reply was watched
    assert torch.equal(plain.sequences, watched.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, watched.scores, strict=True))  # logits, bit for bit
    assert run.fired(0) == run.fired(1) == []


def test_a_reply_fire_at_token_t_steers_from_t_plus_1_exactly_like_manual_steering(found, tmp_path):
    llm = packed(found, tmp_path / "p")
    _, _, _, t = found
    baseline = hooks_on(llm.model)  # transformers keeps its own hooks after an output_hidden_states forward
    plain = unsteered_ids(llm, [PROMPT])[0]
    got, run = engine_ids(llm, [PROMPT], [pol()])
    (d,) = [d for d in run.decisions[0].values() if d.fired]
    assert (d.category, d.where, d.token) == ("cyber", "reply", t) and d.score >= d.threshold and d.prompt_score is not None
    # manual: the pack's refusal action (add feature 7 x 4.0 at layer 2) on generated positions from token t + 1 on
    row = _saes(found[0])[2].sae.W_dec[7].detach()
    vec = row / row.norm() * 4.0
    calls = []

    def add(module, args, output):
        calls.append(1)
        h = output[0] if isinstance(output, tuple) else output
        if len(calls) >= t + 3:  # call 1 is the prefill; call k + 2 reads generated token k
            h = h + vec
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return None

    handle = llm.model.model.layers[2].register_forward_hook(add)
    try:
        manual = unsteered_ids(llm, [PROMPT])[0]
    finally:
        handle.remove()
    assert torch.equal(got[0], manual)
    assert torch.equal(got[0, :t + 2], plain[:t + 2])  # tokens <= t + 1 come from unsteered forwards
    assert not torch.equal(got[0], plain)
    # through generate: the report says where and from when
    r = llm.generate(PROMPT, policy=pol(), max_new_tokens=N)
    assert r.text == llm.tokenizer.decode(manual, skip_special_tokens=True)
    (dec,) = [d for d in r.report.decisions if d.fired]
    assert (dec.where, dec.token) == ("reply", t) and r.report.action == "refuse"
    assert [(a.positions, a.from_token) for a in r.report.applied] == [("generated", t + 1)]
    js = r.report.to_dict()
    assert js["decisions"][0]["where"] == "reply" and js["decisions"][0]["token"] == t and js["applied"][0]["from_token"] == t + 1
    assert hooks_on(llm.model) == baseline


def test_a_mixed_batch_leaves_the_other_row_equal_to_its_solo_output(found, tmp_path):
    llm = packed(found, tmp_path / "p")
    off = pol(watch_reply=False)
    solo_fire = llm.generate(PROMPT, policy=pol(), max_new_tokens=N)
    solo_other = llm.generate(OTHER, policy=off, max_new_tokens=N)
    assert solo_other.text == llm.generate(OTHER, steer=False, max_new_tokens=N).text and solo_other.report.fired == ()
    rows = llm.batch([PROMPT, OTHER], policies=[pol(), off], max_new_tokens=N)
    assert rows[0].report.decisions[0].where == "reply" and rows[0].text == solo_fire.text
    assert rows[1].text == solo_other.text and rows[1].report.fired == ()
    # the policy switch: watch_reply false is part of the hash, and no reply decision is made
    assert llm.compile_policy(off).hash != llm.compile_policy(pol()).hash
    assert llm.generate(PROMPT, policy=off, max_new_tokens=N).report.fired == ()
    assert llm.generate(PROMPT, policy=pol(watch_reply=False), max_new_tokens=N).text == llm.generate(PROMPT, steer=False, max_new_tokens=N).text


def test_the_batching_engine_path_watches_replies_too(found, tmp_path):
    llm = packed(found, tmp_path / "p")
    solo = [llm.generate(PROMPT, policy=pol(), max_new_tokens=N), llm.generate(OTHER, policy=pol(watch_reply=False), max_new_tokens=N)]
    llm.enable_batching(window_ms=200, max_batch=2)
    out: list = [None, None]
    seen: list[int] = []
    llm.batcher.on_batch = seen.append
    threads = [threading.Thread(target=lambda i=i, p=p, q=q: out.__setitem__(i, llm.generate(p, policy=q, max_new_tokens=N)))
               for i, (p, q) in enumerate([(PROMPT, pol()), (OTHER, pol(watch_reply=False))])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    llm.disable_batching()
    assert seen == [2]  # one shared generate call
    assert [r.text for r in out] == [r.text for r in solo]
    assert out[0].report.decisions[0].where == "reply" and out[1].report.fired == ()


def test_block_in_the_reply_ends_the_row_with_the_message(found, tmp_path):
    llm = packed(found, tmp_path / "p")
    _, _, _, t = found
    r = llm.generate(PROMPT, policy=pol("block"), max_new_tokens=N)
    assert r.text == BLOCK and r.finish_reason == "content_filter" and r.report.action == "block" and r.report.message == BLOCK
    assert r.completion_tokens == t + 1  # tokens 0..t were generated, then end of turn was forced
    assert r.report.decisions[0].where == "reply" and r.report.applied == ()
    plain = unsteered_ids(llm, [PROMPT])[0]
    s = llm.stream(PROMPT, policy=pol("block"), max_new_tokens=N)
    pieces = list(s)
    assert pieces[-1] == BLOCK and "".join(pieces[:-1]) == llm.tokenizer.decode(plain[:t + 1], skip_special_tokens=True)
    assert s.result.report.blocked and s.result.finish_reason == "content_filter"
    rows = llm.batch([PROMPT, OTHER], policies=[pol("block"), pol(watch_reply=False)], max_new_tokens=N)
    assert rows[0].text == BLOCK and rows[1].text == llm.generate(OTHER, steer=False, max_new_tokens=N).text


def test_monitor_in_the_reply_reports_and_changes_nothing(found, tmp_path):
    llm = packed(found, tmp_path / "p")
    r = llm.generate(PROMPT, policy=pol("monitor"), max_new_tokens=N)
    assert r.text == llm.generate(PROMPT, steer=False, max_new_tokens=N).text
    assert r.report.fired == ("cyber",) and r.report.action == "monitor" and r.report.decisions[0].where == "reply"


@pytest.mark.parametrize("detect", [{"combine": "sum", "weights": [2.0]}, {"combine": "sum", "weights": [2.0], "order": "reduce_first"},
                                    {"combine": "mean"}])
def test_every_detector_form_scores_the_reply(found, tmp_path, detect):
    loaded, f, thr, t = found
    scale = 2.0 if "weights" in detect else 1.0
    llm = SteeredLLM(loaded, _saes(loaded), None, pack=reply_pack(tmp_path / "p", feature=f, threshold=thr * scale, **detect))
    _, run = engine_ids(llm, [PROMPT], [pol("monitor")])
    assert run.decisions[0]["cyber"].token == t


def test_reply_schema_is_validated(tmp_path):
    path = write_tiny_pack(tmp_path / "a")
    data = yaml.safe_load(path.read_text())
    from safeguard.runtime.pack import Pack

    before = Pack.load(path).content_hash
    for bad in ({"threshold": "high"}, {"threshold": 1.0, "extra": 1}, {}):
        data["categories"]["cyber"]["reply"] = bad
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(PolicyError, match=r"categories\.cyber\.reply"):
            Pack.load(path)
    data["categories"]["cyber"]["reply"] = {"threshold": 2.5}
    path.write_text(yaml.safe_dump(data))
    assert Pack.load(path).categories["cyber"].reply.threshold == 2.5 and Pack.load(path).content_hash != before
    with pytest.raises(PolicyError, match=r"defaults\.watch_reply"):
        Policy.from_dict({**policy_v2(), "defaults": {"watch_reply": "sometimes"}})
    with pytest.raises(PolicyError, match=r"categories\.cyber\.watch_reply"):
        Policy.from_dict(policy_v2(cyber={"watch_reply": [1]}))
    assert Policy.from_dict({**policy_v2(), "defaults": {"watch_reply": True}}).content_hash == Policy.from_dict(policy_v2()).content_hash
