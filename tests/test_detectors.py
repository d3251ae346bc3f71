"""Richer detectors: sparse (L1) probes, and probes on pooled plus last-user-token features that the engine scores
exactly as selection fitted them (``detect.last_weights``), and what reply watching does with them (refused)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import policy_dict, policy_v2, write_tiny_pack
from test_selection import _tiny_data

from safeguard import Policy, PolicyError, SteeredLLM
from safeguard.lab.selection import Chat, DetectConfig, Detector, SelectConfig, detection_scores, leave_one_source_out, pooled_features
from safeguard.lab.selection.detection import fit_l1_probe, fit_probe, keep_columns
from safeguard.lab.selection.generalize import auc
from safeguard.lab.selection.stages import _detector, fit_detectors, prepare, prompt_statistics
from safeguard.runtime.pack import Pack
from safeguard.runtime.steering import detection_score, last_positions

PROMPTS = ["a first prompt", "the second prompt is longer than the first one", "third"]


def _planted(n: int = 200, k: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.rand(n, k, generator=g), torch.rand(n, k, generator=g)
    pos[:, 0] += 0.6  # two planted columns, the rest noise
    pos[:, 3] += 0.4
    return pos, neg


def test_the_l1_probe_zeroes_the_noise_columns_and_keeps_the_planted_ones():
    pos, neg = _planted()
    w, _ = fit_l1_probe(pos, neg, l1=0.02)
    assert w[0] > 0 and w[3] > 0
    assert int((w != 0).sum()) <= 6  # most noise columns exactly zero
    dense, _ = fit_probe(pos, neg, l2=1e-2)
    assert int((dense != 0).sum()) == pos.shape[1]  # an L2 probe keeps every column
    strong, _ = fit_l1_probe(pos, neg, l1=0.5)
    assert int((strong != 0).sum()) == 0  # a penalty that outweighs every gain keeps nothing
    kept = keep_columns(pos, neg, n_features=10, l1=0.02)
    assert set(kept.tolist()) == {j for j in range(pos.shape[1]) if w[j] != 0} and {0, 3} <= set(kept.tolist())
    assert keep_columns(pos, neg, n_features=1, l1=0.02).tolist() == [0]  # n_features caps the non-zero ones
    assert keep_columns(pos, neg, n_features=4, l1=0.5).numel() == 0


def test_detect_configs_name_their_penalty_and_pooling_and_are_checked():
    assert DetectConfig(64, 48, 1.0).name == "top64->48, l2=1"  # the shipped names are unchanged
    assert DetectConfig(128, 48, 1e-2, l1=0.01).name == "top128->48, l2=0.01, l1=0.01"
    cfg = DetectConfig(4, 6, 1e-2, pool="max+last")  # two readings per candidate: up to twice the candidates
    assert cfg.name == "top4->6, l2=0.01, +last token" and cfg.last and cfg.columns([2, 0], 10) == [2, 0, 12, 10]
    assert DetectConfig(4, 2, 1e-2).columns([2, 0], 10) == [2, 0]
    from safeguard import SelectionError

    for bad in ({"pool": "mean"}, {"l1": -1.0}, {"n_features": 9, "pool": "max+last"}, {"n_features": 5}):
        with pytest.raises(SelectionError):
            DetectConfig(**{"n_candidates": 4, "n_features": 2, "l2": 1e-2, **bad})


def test_a_probe_on_design_columns_becomes_a_detector_with_a_weight_per_reading():
    union = [11, 22, 33]
    # columns: 1 = feature 22 pooled, 3 = feature 11 at the last token, 4 = feature 22 at the last token
    det = _detector("c", [1, 3, 4], torch.tensor([0.5, -1.0, 2.0]), union, "max", True)
    assert det.features == [22, 11] and det.weights == [0.5, 0.0] and det.last_weights == [2.0, -1.0] and det.order == "reduce_first"
    plain = _detector("c", [2, 0], torch.tensor([0.25, 1.0]), union, "max", False)
    assert plain.features == [33, 11] and plain.weights == [0.25, 1.0] and plain.last_weights is None
    assert "last_weights" not in plain.key() and det.key()["last_weights"] == [2.0, -1.0]


def test_the_last_position_of_a_mask():
    mask = torch.tensor([[False, True, True, False], [True, False, False, True], [False, False, False, False]])
    assert last_positions(mask).tolist() == [2, 3, 0]
    acts = torch.arange(24, dtype=torch.float32).reshape(3, 4, 2)
    s = detection_score(acts, mask, weights=torch.tensor([1.0, 0.0]), combine="sum", reduce="max", order="reduce_first",
                        last_weights=torch.tensor([0.0, 10.0]))
    # row 0: max of feature 0 over positions 1, 2 is 4; feature 1 at position 2 is 5 -> 4 + 50
    assert s[0] == 54.0 and s[1] == 14.0 + 150.0 and s[2] == float("-inf")


def _engine_scores(llm, prompts, det: Detector, turns: str = "all") -> torch.Tensor:
    pol = policy_dict(features=det.features)
    pol["categories"][0]["detect"].update(weights=det.weights, combine="sum", reduce=det.reduce, order="reduce_first",
                                          last_weights=det.last_weights, turns=turns)
    return torch.tensor([r.report.decisions[0].score for r in llm.batch(prompts, policy=Policy.from_dict(pol), max_new_tokens=1)])


def test_pooled_and_last_token_features_times_weights_are_the_engines_scores(llm):
    det = Detector("cyber", [3, 5, 9], [0.5, -2.0, 1.0], "max", "reduce_first", [1.5, 0.0, -0.75])
    pooled, last = pooled_features(llm, PROMPTS, det.features, layer=1, reduce="max", batch_size=2, last=True)
    assert torch.equal(pooled, pooled_features(llm, PROMPTS, det.features, layer=1, reduce="max", batch_size=2))  # the same max pooling
    mine = pooled @ torch.tensor(det.weights) + last @ torch.tensor(det.last_weights)
    torch.testing.assert_close(mine, detection_scores(llm, PROMPTS, [det], layer=1)["cyber"], rtol=1e-4, atol=1e-5)
    engine = _engine_scores(llm, PROMPTS, det)
    torch.testing.assert_close(mine, engine, rtol=1e-4, atol=1e-5)
    without = _engine_scores(llm, PROMPTS, Detector("cyber", det.features, det.weights, "max", "reduce_first"))
    torch.testing.assert_close(pooled @ torch.tensor(det.weights), without, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(without, engine)  # the last token changes the score


def test_a_conversation_is_read_at_the_last_token_of_its_last_turn_exactly_as_the_engine_reads_it(llm):
    chats = [Chat([{"role": "user", "content": "tell me about locks and keys"}, {"role": "assistant", "content": "Locks hold doors."},
                   {"role": "user", "content": "and how would I open one that is not mine"}]),
             Chat([{"role": "user", "content": "a question about soup"}, {"role": "assistant", "content": "Sure."},
                   {"role": "user", "content": "thanks"}])]
    det = Detector("cyber", [3, 5, 9], [0.5, -2.0, 1.0], "max", "reduce_first", [1.0, 1.0, -1.0])
    pooled, last = pooled_features(llm, chats, det.features, layer=1, reduce="max", batch_size=2, last=True)
    mine = pooled @ torch.tensor(det.weights) + last @ torch.tensor(det.last_weights)
    engine = _engine_scores(llm, [list(c.messages) for c in chats], det, turns="last")
    torch.testing.assert_close(mine, engine, rtol=1e-4, atol=1e-5)


def test_last_weights_need_a_weighted_reduce_first_sum_and_leave_older_files_hashes_alone():
    pol = policy_dict(features=[3, 5])
    pol["categories"][0]["detect"].update(weights=[1.0, 1.0], combine="sum", order="reduce_first")
    plain = Policy.from_dict(pol)
    assert "last_weights" not in json.dumps(plain.model_dump(mode="json"))  # unset: not in the dump, so the hash is what it was
    for change, match in (({"order": "combine_first", "last_weights": [1.0, 1.0]}, "last_weights needs weights"),
                          ({"last_weights": [1.0]}, "last_weights has 1 entries but features has 2")):
        bad = json.loads(json.dumps(pol))
        bad["categories"][0]["detect"].update(change)
        with pytest.raises(PolicyError, match=match):
            Policy.from_dict(bad)
    bad = json.loads(json.dumps(pol))
    bad["categories"][0]["detect"].update(weights=None, combine="max", last_weights=[1.0, 1.0])
    with pytest.raises(PolicyError, match="last_weights needs weights"):
        Policy.from_dict(bad)


def _last_token_pack(tmp_path, *, reply: bool):
    import yaml

    path = write_tiny_pack(tmp_path / f"pack-{reply}")
    data = yaml.safe_load(path.read_text())
    data["categories"]["cyber"]["detect"] = {"layer": 1, "features": [3, 5], "weights": [0.5, 1.0], "combine": "sum", "reduce": "max",
                                             "order": "reduce_first", "turns": "last", "last_weights": [1.0, -0.5]}
    if reply:
        data["categories"]["cyber"]["reply"] = {"threshold": 1.0}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_pack_refuses_reply_watching_on_a_last_token_detector_and_scores_it_at_the_prompt(llm, tmp_path):
    with pytest.raises(PolicyError, match=r"categories\.cyber.*reply watching is not defined for a detector with detect\.last_weights"):
        Pack.load(_last_token_pack(tmp_path, reply=True))
    pack = Pack.load(_last_token_pack(tmp_path, reply=False))
    assert pack.categories["cyber"].detect.last_weights == [1.0, -0.5]
    steered = SteeredLLM(llm._loaded, llm.saes, None, pack=pack.source)
    r = steered.generate(PROMPTS[1], policy=Policy.from_dict(policy_v2(cyber={"response": "monitor"}, fraud={"response": "off"})),
                         max_new_tokens=2)
    (d,) = [d for d in r.report.decisions if d.category == "cyber"]
    det = Detector("cyber", [3, 5], [0.5, 1.0], "max", "reduce_first", [1.0, -0.5])
    assert d.score == pytest.approx(float(detection_scores(llm, [PROMPTS[1]], [det], layer=1)["cyber"][0]), rel=1e-4, abs=1e-5)


def test_leave_one_source_out_finds_a_signal_that_only_the_last_token_carries():
    torch.manual_seed(0)
    a, b, neg, val = 30, 30, 40, 40
    n = a + b + neg + val
    pooled, last = torch.rand(n, 2) * 0.2, torch.rand(n, 2) * 0.2
    last[: a + b, 1] += 1.0  # the harm shows at the last token only
    positives = {"security_risks": {"a": list(range(a)), "b": list(range(a, a + b))}}
    args = (pooled, [0, 1], positives, list(range(a + b, a + b + neg)), list(range(a + b + neg, n)), lambda c, w, k: [0, 1][:k])
    configs = [DetectConfig(2, 2, 1e-2), DetectConfig(2, 2, 1e-2, pool="max+last"), DetectConfig(2, 4, 1e-2, l1=1e-3, pool="max+last")]
    gen = leave_one_source_out(*args, configs, fpr=0.0, last=last)
    assert gen.worst("top2->2, l2=0.01, +last token") == 1.0 and gen.worst("top2->2, l2=0.01") < 0.5
    assert gen.chosen != "top2->2, l2=0.01"
    pc = gen.folds["top2->2, l2=0.01, +last token"][0].per_category["security_risks"]
    assert pc["auc"] == 1.0 and 1 <= pc["features"] <= 2
    from safeguard import SelectionError

    with pytest.raises(SelectionError, match="need the last-token features"):
        leave_one_source_out(*args, configs)


def test_select_with_a_last_token_configuration_writes_what_the_engine_scores(llm, tmp_path, monkeypatch):
    """A pack whose detectors read the last user token: no reply entry for them, and the engine's prompt scores are
    the scores selection calibrated the thresholds on."""
    from safeguard.lab.selection import select

    monkeypatch.setenv("SAFEGUARD_CACHE", str(tmp_path / "cache"))
    cfg = SelectConfig(categories=["security_risks", "misinformation"], detect_layer=1, steer_layer=2,
                       detect_configs=[DetectConfig(4, 3, 1e-2, pool="max+last"), DetectConfig(4, 3, 1e-2, l1=1e-3, pool="max+last")],
                       n_steer_features=2, n_candidates=3, min_prompts=2, n_refusal_pairs=4, n_causal_prompts=2, strengths=(0.5,),
                       n_val_harmful=4, n_val_benign=4, max_new_tokens=2, n_wrapped_harmful=0, n_reply_benign=4)
    out = tmp_path / "pack" / "pack.yaml"
    select(llm, out=out, data=_tiny_data(), progress=False, config=cfg)
    pack = Pack.load(out)
    assert all(pc.detect.last_weights is not None and pc.reply is None for pc in pack.categories.values())
    prep = prepare(llm, cfg, _tiny_data())
    det = fit_detectors(llm, cfg, prep, prompt_statistics(llm, cfg, prep, progress=False), progress=False)
    assert det.last is not None and det.generalization is not None
    texts = det.texts[:6]
    assert any(isinstance(t, Chat) for t in texts)  # a conversation too, read at its last turn
    messages = [list(t.messages) if isinstance(t, Chat) else t for t in texts]
    for d in det.detectors:
        pd = pack.categories[d.category].detect
        assert (d.features, d.weights, d.last_weights) == (pd.features, pd.weights, pd.last_weights)
        mine = det.scores[d.category][det.rows_of(texts)]
        torch.testing.assert_close(mine, detection_scores(llm, texts, [d], layer=1)[d.category], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine, _engine_scores(llm, messages, d, turns="last"), rtol=1e-4, atol=1e-5)


def test_the_engine_refuses_to_watch_the_reply_of_a_last_token_detector():
    """The pack refuses the combination; the engine's reply detector guards against hand-built categories too."""
    from safeguard.runtime.steering import _Category, _ReplyDetector

    cat = _Category("cyber", "Cyber", "monitor", 1, 0.0, "sum", "max", torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), [], "reduce_first",
                    reply_threshold=1.0, last_weights=torch.tensor([0.5, 0.5]))
    with pytest.raises(PolicyError, match=r"\['cyber'\] read the last user token"):
        _ReplyDetector([(cat, None)], None, torch.device("cpu"))


def test_negative_weights_make_a_probe_push_hard_negatives_down():
    pos, neg = _planted()
    neg[:20, 0] += 0.6  # hard negatives: they carry the positives' strongest column
    w0, b0 = fit_probe(pos, neg, l2=1e-2)
    same, b_same = fit_probe(pos, neg, l2=1e-2, neg_weight=torch.full((len(neg),), 3.0))  # equal weights, any scale: the default probe
    assert torch.allclose(w0, same, atol=1e-5) and b0 == pytest.approx(b_same, abs=1e-5)
    hard = torch.ones(len(neg))
    hard[:20] = 10.0
    wh, _ = fit_probe(pos, neg, l2=1e-2, neg_weight=hard)

    # the positives now rank above the hard negatives more often (scale-free: AUC of positives vs hard negatives)
    assert auc(pos @ wh, neg[:20] @ wh) > auc(pos @ w0, neg[:20] @ w0) + 0.01
    assert float(wh[3]) / float(wh[0]) > float(w0[3]) / float(w0[0])  # by leaning on the column they do not share
    wl, _ = fit_l1_probe(pos, neg, l1=0.02, neg_weight=hard)
    assert float(wl[3]) / float(wl[0]) > 0
    for bad in (torch.ones(3), -torch.ones(len(neg)), torch.zeros(len(neg))):
        with pytest.raises(ValueError, match="neg_weight"):
            fit_probe(pos, neg, neg_weight=bad)
