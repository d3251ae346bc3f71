"""Iteration-level batching (runtime/continuous.py, the default batching mode) on the tiny random Llama: requests join
the running batch between decode steps, rows that end leave it, and each row keeps its own settings and steering.

Nothing is timed. A pre-hook on the decoder stack logs every forward as (positions, rows) and can submit a request
from inside forward k (the worker's own thread), so the request is waiting before that forward ends and is admitted
right after it: which forward a row joins at is exact.

Float rounding: a row decoded beside others attends over left padding and shares matrix products with other rows,
which may change the last bits of its logits; rows prefilled together are padded to the longest. On this model that
never changes a greedy token, so texts are compared exactly; detection scores of rows prefilled with others are
compared with ``pytest.approx(rel=1e-5)`` (a row prefilled alone is scored as a single request is, bit for bit)."""

from __future__ import annotations

import threading

import pytest
from _tiny import hooks_on, policy_dict
from test_openers import OPENER, REFUSE, llm_with, pack_with, pol
from test_reply import BLOCK, found, reply_pack  # noqa: F401  (found is a fixture)
from test_reply import PROMPT as REPLY_PROMPT
from test_reply import pol as reply_pol

from safeguard import Policy, SteeredLLM
from safeguard.runtime.batching import Settings
from safeguard.runtime.steering import RunState

OTHER = Policy.from_dict(policy_dict(threshold=1e9) | {"name": "other"})  # never fires
SHADOW = Policy.from_dict(policy_dict() | {"name": "shadow"})  # always fires
LONG = "Tell me a long story about a lighthouse keeper."
SHORT = "hi"


class _Forwards:
    """Logs each forward of the decoder stack as (positions, rows); ``at[k]()`` runs inside forward k (from 1)."""

    def __init__(self, llm, at=None):
        self.log: list[tuple[int, int]] = []
        self.at = dict(at or {})
        self._h = llm.model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        self.log.append((int(x.shape[1]), int(x.shape[0])))
        fn = self.at.get(len(self.log))
        if fn is not None:
            fn()

    def remove(self) -> None:
        self._h.remove()


def _length(llm, prompt) -> int:
    return len(llm.token_masks(prompt)[0])


def _same(batched, solo) -> None:
    """A row's result equals its single request's: text, tokens, ending and report (scores within float noise)."""
    assert (batched.text, batched.completion_tokens, batched.finish_reason) == (solo.text, solo.completion_tokens, solo.finish_reason)
    a, b = batched.report, solo.report
    assert (a.policy_name, a.action, a.fired, a.applied, a.opener, a.message) == (b.policy_name, b.action, b.fired, b.applied, b.opener, b.message)
    assert [(d.category, d.fired, d.where, d.token) for d in a.decisions] == [(d.category, d.fired, d.where, d.token) for d in b.decisions]
    assert [d.score for d in a.decisions] == pytest.approx([d.score for d in b.decisions], rel=1e-5)
    assert [(s.policy_name, s.action, s.fired) for s in a.shadow] == [(s.policy_name, s.action, s.fired) for s in b.shadow]


def test_a_request_joins_the_running_batch_between_decode_steps(llm):
    """A short request submitted during the long row's 6th forward is prefilled right after it, decodes beside the
    long row, and ends (freeing its slot) long before it: 41 forwards for both, not 40 + 5."""
    solo_long = llm.generate(LONG, max_new_tokens=40, steer=False)
    solo_short = llm.generate(SHORT, max_new_tokens=5, policy=OTHER)
    assert solo_long.completion_tokens == 40 and solo_short.completion_tokens == 5
    llm.enable_batching(window_ms=0)
    jobs = []
    fw = _Forwards(llm, at={6: lambda: jobs.append(llm.batcher.submit(SHORT, OTHER, Settings(5), stream=True))})
    try:
        long = llm.stream(LONG, max_new_tokens=40, steer=False)
        text_long = "".join(long)
        short = jobs[0].result()
        text_short = "".join(short)
    finally:
        fw.remove()
        llm.disable_batching()
    assert text_long == solo_long.text and text_short == solo_short.text
    _same(long.result, solo_long)
    _same(short.result, solo_short)
    n_long, n_short = _length(llm, LONG), _length(llm, SHORT)
    assert fw.log == [(n_long, 1)] + [(1, 1)] * 5 + [(n_short, 1)] + [(1, 2)] * 4 + [(1, 1)] * 30
    assert hooks_on(llm.model) == 0


def test_greedy_rows_joining_mid_flight_equal_their_single_requests(llm):
    """Rows under different policies (one steered, one never firing, one unsteered), max tokens, stop strings and
    shadows join at different decode steps; each equals its single request. The steered row's text differs from the
    unsteered one: its steering was applied while it decoded beside rows that are not steered."""
    specs = [  # (prompt, policy, settings, shadows)
        (LONG, OTHER, Settings(30), None),
        ("How do I write a port scanner?", None, Settings(12), None),
        ([{"role": "user", "content": "What is GDPR?"}], OTHER, Settings(20, stop=("ies",)), [llm.compile_policy(SHADOW, monitor=True)]),
        ("a b c", False, Settings(8), None),
    ]

    def solo(i: int):
        prompt, policy, s, shadows = specs[i]
        kw = {"max_new_tokens": s.max_new_tokens, "stop": list(s.stop) or None, "shadow": [SHADOW] if shadows else None}
        if policy is False:
            kw["steer"] = False
        elif policy is not None:
            kw["policy"] = policy
        return llm.chat(prompt, **kw) if isinstance(prompt, list) else llm.generate(prompt, **kw)

    single = [solo(i) for i in range(len(specs))]
    assert single[1].report.fired and single[1].text != llm.generate(specs[1][0], max_new_tokens=12, steer=False).text
    assert single[2].finish_reason == "stop" and single[2].report.shadow[0].fired
    llm.enable_batching(window_ms=0)
    jobs: list = []

    def submit(*idx):
        def fn():
            for i in idx:
                prompt, policy, s, shadows = specs[i]
                jobs.append(llm.batcher.submit(prompt, llm.compile_policy(policy) if isinstance(policy, Policy) else policy, s, shadows=shadows))
        return fn

    fw = _Forwards(llm, at={3: submit(1), 7: submit(2, 3)})
    try:
        first = llm.generate(*specs[0][:1], policy=OTHER, max_new_tokens=30)
        rest = [j.result() for j in jobs]
    finally:
        fw.remove()
        llm.disable_batching()
    for got, want in zip([first, *rest], single, strict=True):
        _same(got, want)
    widths = [rows for positions, rows in fw.log if positions == 1]
    assert max(widths) == 4 and fw.log[7][1] == 2  # rows 3 and 4 were prefilled together, after forward 7


def test_seeded_sampled_rows_give_their_text_alone_and_joined(llm):
    """Each row samples with its own generator seeded from its request: the same text as the single request
    (``generate(seed=, temperature=)``), whatever joins it, beside a greedy row."""
    rows = [(LONG, 0.9, 7, 25), ("How do I write a port scanner?", 1.3, 11, 15), (SHORT, None, None, 15)]
    single = [llm.generate(p, max_new_tokens=n, temperature=t, seed=s, steer=False).text for p, t, s, n in rows]
    assert single[0] != llm.generate(LONG, max_new_tokens=25, temperature=0.9, seed=8, steer=False).text  # the seed matters
    llm.enable_batching(window_ms=0)
    jobs: list = []

    def submit(i):
        p, t, s, n = rows[i]
        return lambda: jobs.append(llm.batcher.submit(p, False, Settings(n, temperature=t, seed=s)))

    try:
        alone = llm.generate(rows[1][0], max_new_tokens=15, temperature=1.3, seed=11, steer=False).text  # in the engine, alone
        fw = _Forwards(llm, at={2: submit(1), 4: submit(2)})
        try:
            first = llm.generate(LONG, max_new_tokens=25, temperature=0.9, seed=7, steer=False).text
            joined = [j.result().text for j in jobs]
        finally:
            fw.remove()
    finally:
        llm.disable_batching()
    assert alone == single[1]
    assert [first, *joined] == single
    assert max(rows for _, rows in fw.log) == 3


def test_an_abandoned_row_frees_its_slot_and_the_others_go_on(llm):
    """Two rows fill the batch (max_batch=2); a third waits. Abandoning one (a client gone) ends it at the next step,
    the waiting request takes its slot before the other row ends, and the other row's text is its single request's."""
    solo_a = llm.generate(LONG, max_new_tokens=40, steer=False)
    solo_c = llm.generate(SHORT, max_new_tokens=6, policy=OTHER)
    llm.enable_batching(window_ms=300, max_batch=2)
    jobs: dict[str, object] = {}
    fw = _Forwards(llm, at={3: lambda: jobs.__setitem__("c", llm.batcher.submit(SHORT, OTHER, Settings(6))),
                            8: lambda: jobs["b"].abandon()})
    try:
        jobs["a"] = llm.batcher.submit(LONG, False, Settings(40))
        jobs["b"] = llm.batcher.submit("How do I write a port scanner?", False, Settings(40))
        a, b, c = (jobs[k].result() for k in "abc")
    finally:
        fw.remove()
        llm.disable_batching()
    _same(a, solo_a)
    _same(c, solo_c)
    assert b.completion_tokens < 40 and b.finish_reason == "stop"
    assert max(rows for _, rows in fw.log) == 2
    prefills = [i for i, (positions, _) in enumerate(fw.log) if positions > 1]
    assert len(prefills) == 2 and prefills[1] == 8  # the third row was prefilled right after the 8th forward
    assert sum(1 for positions, _ in fw.log if positions == 1) == 39  # a's 39 decode steps; c's 5 were among them
    assert hooks_on(llm.model) == 0


def test_closing_a_stream_frees_its_slot(llm):
    llm.enable_batching(window_ms=0, max_batch=1)
    batcher = llm.batcher
    try:
        s = llm.stream(LONG, max_new_tokens=60, steer=False)
        next(s)
        s.close()
        assert s.result.completion_tokens < 60
        assert llm.generate(SHORT, max_new_tokens=3, steer=False).completion_tokens == 3  # the only slot is free again
    finally:
        llm.disable_batching()
    assert batcher.running == 0 and batcher.pending == 0


def test_openers_and_blocks_of_rows_joining_mid_flight(tiny_model, tokenizer, saes, tmp_path):
    """A refusing row (its pack's opener forced, then steered), a blocked row and a row that does not fire join a
    running batch at different steps; each equals its single request."""
    llm = llm_with(pack_with(tmp_path / "opened"), tiny_model, tokenizer, saes)
    refuse, block, quiet = pol(**REFUSE), pol(cyber={"response": "block"}), pol(cyber={"sensitivity": "relaxed"})
    single = [llm.generate(LONG, policy=quiet, max_new_tokens=30), llm.generate("hello there", policy=refuse, max_new_tokens=14),
              llm.generate("a b c", policy=block, max_new_tokens=14)]
    assert single[1].report.opener and single[1].text.startswith(OPENER) and single[2].report.blocked
    llm.enable_batching(window_ms=0)
    jobs: list = []

    def submit(prompt, policy):
        return lambda: jobs.append(llm.batcher.submit(prompt, llm.compile_policy(policy), Settings(14), stream=True))

    fw = _Forwards(llm, at={4: submit("hello there", refuse), 6: submit("a b c", block)})
    try:
        first = llm.generate(LONG, policy=quiet, max_new_tokens=30)
        streams = [j.result() for j in jobs]
        texts = ["".join(s) for s in streams]
    finally:
        fw.remove()
        llm.disable_batching()
    _same(first, single[0])
    for s, want in zip(streams, single[1:], strict=True):
        _same(s.result, want)
    assert texts[0] == single[1].text and texts[1] == single[2].text
    assert max(rows for _, rows in fw.log) == 2


def test_a_pack_that_ends_refusals_with_its_opener_ends_them_in_the_running_batch(tiny_model, tokenizer, saes, tmp_path):
    """``after_opener: end``: a refusing row that joins mid-flight is the opener alone, as its single request is."""
    llm = llm_with(pack_with(tmp_path / "ended", after_opener="end"), tiny_model, tokenizer, saes)
    refuse, quiet = pol(**REFUSE), pol(cyber={"sensitivity": "relaxed"})
    single = [llm.generate(LONG, policy=quiet, max_new_tokens=30), llm.generate("hello there", policy=refuse, max_new_tokens=14)]
    assert single[1].text == OPENER and single[1].finish_reason == "stop"
    llm.enable_batching(window_ms=0)
    jobs: list = []
    fw = _Forwards(llm, at={4: lambda: jobs.append(llm.batcher.submit("hello there", llm.compile_policy(refuse), Settings(14)))})
    try:
        first = llm.generate(LONG, policy=quiet, max_new_tokens=30)
        joined = jobs[0].result()
    finally:
        fw.remove()
        llm.disable_batching()
    _same(first, single[0])
    _same(joined, single[1])
    assert max(rows for _, rows in fw.log) == 2


def test_a_failed_shared_step_fails_only_the_bad_row(llm, monkeypatch, caplog):
    """A row whose steering raises from its 4th forward on breaks a shared decode step: each row is run again alone,
    the bad row gets its error, and the others (a stream already handing out text among them) end as their single
    requests do."""
    bad = Policy.from_dict(policy_dict() | {"name": "bad"})
    steer = RunState._steer

    def flaky(self, layer, h):
        p = self.policies[0]
        if p is not None and p.policy.name == "bad" and self.calls >= 4:
            raise RuntimeError("boom")
        return steer(self, layer, h)

    monkeypatch.setattr(RunState, "_steer", flaky)
    solo = [llm.generate(LONG, max_new_tokens=20, policy=OTHER), llm.generate(SHORT, max_new_tokens=20, steer=False)]
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate("a b c", policy=bad, max_new_tokens=10)
    llm.enable_batching(window_ms=0)
    jobs: list = []
    fw = _Forwards(llm, at={3: lambda: jobs.extend([llm.batcher.submit(SHORT, False, Settings(20)),
                                                    llm.batcher.submit("a b c", llm.compile_policy(bad), Settings(10))])})
    try:
        s = llm.stream(LONG, max_new_tokens=20, policy=OTHER)
        pieces = [next(s)]
        rest = "".join(s)
        quiet = jobs[0].result()
        with pytest.raises(RuntimeError, match="boom"):
            jobs[1].result()
    finally:
        fw.remove()
        llm.disable_batching()
    assert pieces[0] + rest == solo[0].text and s.result.text == solo[0].text
    _same(quiet, solo[1])
    assert "a decode step of 3 rows failed (RuntimeError); running each row again alone" in caplog.text
    assert hooks_on(llm.model) == 0


def test_requests_from_many_threads_all_end(llm):
    """Eight threads, two requests each, into a batch of four slots: every request ends with its single text."""
    prompts = [LONG, SHORT, "a b c", "What is GDPR?"]
    single = {(p, n): llm.generate(p, max_new_tokens=n, policy=OTHER).text for p in prompts for n in (3, 9)}
    llm.enable_batching(window_ms=1, max_batch=4)
    out: dict[tuple[int, int], str] = {}

    def work(i: int) -> None:
        for k in range(2):
            p, n = prompts[(i + k) % 4], (3, 9)[(i * 2 + k) % 2]
            out[(i, k)] = (llm.generate(p, max_new_tokens=n, policy=OTHER).text, single[(p, n)])

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        llm.disable_batching()
    assert len(out) == 16 and all(got == want for got, want in out.values())


def test_a_failed_shared_prefill_is_retried_row_by_row(llm, monkeypatch, caplog):
    """A row whose detection raises breaks the prefill it shares: the rows are prefilled again one by one, the bad
    one gets its error, a streaming neighbour its single request's text."""
    bad = Policy.from_dict(policy_dict() | {"name": "bad"})
    detect = RunState._detect

    def flaky(self, layer, h):
        if any(p is not None and p.policy.name == "bad" for p in self.policies):
            raise RuntimeError("boom")
        return detect(self, layer, h)

    monkeypatch.setattr(RunState, "_detect", flaky)
    solo = llm.generate(SHORT, max_new_tokens=8)
    llm.enable_batching(window_ms=300, max_batch=8)
    fw = _Forwards(llm)
    try:
        good = llm.batcher.submit(SHORT, None, Settings(8), stream=True)
        doomed = llm.batcher.submit("a b c", llm.compile_policy(bad), Settings(8))
        text = "".join(good.result())
        with pytest.raises(RuntimeError, match="boom"):
            doomed.result()
    finally:
        fw.remove()
        llm.disable_batching()
    assert text == solo.text
    assert [rows for positions, rows in fw.log if positions > 1] == [2, 1, 1]  # together, then each alone
    assert "a prefill of 2 rows failed (RuntimeError); prefilling them one by one" in caplog.text
    assert hooks_on(llm.model) == 0


def test_models_whose_cache_cannot_be_joined_fall_back_to_the_window_batcher(llm, caplog):
    from transformers import MistralConfig, MistralForCausalLM

    from safeguard.runtime.continuous import supports_iteration

    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, sliding_window=8))
    assert supports_iteration(llm.model) and not supports_iteration(sliding)
    llm._loaded.model, real = sliding, llm.model
    try:
        assert llm.enable_batching().mode == "window" and type(llm.batcher).__name__ == "MicroBatcher"
        assert "falls back to mode='window'" in caplog.text
    finally:
        llm.disable_batching()
        llm._loaded.model = real


def test_reply_watching_of_rows_joining_mid_flight(found, saes, tmp_path):  # noqa: F811
    """Rows whose pack category fires in the reply (refuse: steered from the next token; block: ended with the
    message) join a running batch at different steps: each fires at the same token as its single request, and its
    text and report equal the single request's."""
    loaded, feature, threshold, t = found
    llm = SteeredLLM(loaded, saes, None, pack=reply_pack(tmp_path / "p", feature=feature, threshold=threshold))
    quiet = reply_pol(watch_reply=False)
    single = [llm.generate(LONG, policy=quiet, max_new_tokens=30), llm.generate(REPLY_PROMPT, policy=reply_pol(), max_new_tokens=10),
              llm.generate(REPLY_PROMPT, policy=reply_pol("block"), max_new_tokens=10)]
    assert [d.where for d in single[1].report.decisions if d.fired] == ["reply"] and single[1].report.decisions[0].token == t
    assert single[2].text == BLOCK and single[2].finish_reason == "content_filter"
    llm.enable_batching(window_ms=0)
    jobs: list = []

    def submit(policy, stream):
        return lambda: jobs.append(llm.batcher.submit(REPLY_PROMPT, llm.compile_policy(policy), Settings(10), stream=stream))

    fw = _Forwards(llm, at={3: submit(reply_pol(), False), 5: submit(reply_pol("block"), True)})
    try:
        first = llm.generate(LONG, policy=quiet, max_new_tokens=30)
        refused = jobs[0].result()
        stream = jobs[1].result()
        pieces = list(stream)
    finally:
        fw.remove()
        llm.disable_batching()
    _same(first, single[0])
    _same(refused, single[1])
    _same(stream.result, single[2])
    assert pieces[-1] == BLOCK
    assert max(rows for _, rows in fw.log) == 3


def test_max_time_ends_a_row_as_a_single_request(llm):
    """``max_time`` is the row's own: 0 s ends it after its first token with finish reason ``time``, as alone."""
    alone = llm.generate(SHORT, max_new_tokens=50, max_time=0.0, steer=False)
    llm.enable_batching(window_ms=0)
    try:
        batched = llm.generate(SHORT, max_new_tokens=50, max_time=0.0, steer=False)
    finally:
        llm.disable_batching()
    assert (alone.finish_reason, alone.completion_tokens) == ("time", 1)
    _same(batched, alone)
