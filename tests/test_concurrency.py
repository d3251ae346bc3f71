"""Concurrency on one SteeredLLM (tiny random Llama): policy swaps never wait behind generation, cancelled async calls
stop their generation, batched streams, per-row settings in one generate. Ordering is asserted with events and
decode-step counts, never with wall-clock thresholds (timeouts only bound a failing test)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from _tiny import hooks_on, policy_dict

from safeguard import Policy

OTHER = policy_dict(threshold=1e9) | {"name": "other"}


class _Steps:
    """Counts model forwards (one per decode step) with a pre-hook on the decoder stack; ``pause_at`` makes the
    generating thread wait at that step until ``release`` is set."""

    def __init__(self, llm, pause_at: int | None = None):
        self.n = 0
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.release = threading.Event()
        self.resumed = threading.Event()
        """Set once the paused step went on (released, or its bounding timeout passed)."""
        self.reached: dict[int, threading.Event] = {}
        self._h = llm.model.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1
        for k, ev in self.reached.items():
            if self.n >= k:
                ev.set()
        if self.n == self.pause_at:
            self.paused.set()
            self.release.wait(10)  # bounds a failing test only
            self.resumed.set()

    def at(self, k: int) -> threading.Event:
        return self.reached.setdefault(k, threading.Event())

    def remove(self) -> None:
        self._h.remove()


# -------------------------------------------------------------------------------------------- use_policy
def test_use_policy_does_not_wait_behind_a_running_generation(llm):
    steps = _Steps(llm, pause_at=3)
    order: list[str] = []
    result = {}

    def gen() -> None:
        result["r"] = llm.generate("a long story please", max_new_tokens=20)
        order.append("generation done")

    t = threading.Thread(target=gen)
    t.start()
    try:
        assert steps.paused.wait(30)  # the generation holds the model, mid-decode
        llm.use_policy(Policy.from_dict(OTHER))  # with one shared lock this waited for the generation (10 s here)
        order.append("use_policy returned")
        assert not steps.resumed.is_set()  # returned while the generation was still paused mid-decode
        assert llm.policy.name == "other"
    finally:
        steps.release.set()
        t.join(60)
        steps.remove()
    assert order == ["use_policy returned", "generation done"]
    assert result["r"].report.policy_name == "tiny"  # the running call kept the policy it began with
    assert llm.generate("hi", max_new_tokens=2).report.policy_name == "other"


# ------------------------------------------------------------------------------------- cancelled async calls
@pytest.mark.parametrize("method", ["agenerate", "achat", "abatch"])
async def test_a_cancelled_async_call_stops_its_generation(llm, method):
    steps = _Steps(llm)
    prompt = {"agenerate": "tell me a very long story", "achat": [{"role": "user", "content": "tell me a very long story"}],
              "abatch": ["tell me a very long story", "and another"]}[method]
    try:
        task = asyncio.ensure_future(getattr(llm, method)(prompt, max_new_tokens=200))
        await asyncio.to_thread(steps.at(5).wait, 30)  # five decode steps in
        task.cancel()
        at_cancel = steps.n
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped_at = steps.n  # the worker has returned before the cancellation reached us
        assert stopped_at - at_cancel <= 2  # it stopped at the next decode step (200 with the old to_thread)
        assert llm._model_lock.acquire(blocking=False)  # the model is free: the next call starts at once
        llm._model_lock.release()
        r = await llm.agenerate("hi", max_new_tokens=2)
        assert steps.n - stopped_at <= 2 and r.completion_tokens <= 2  # only the new call's own steps ran
        assert hooks_on(llm.model) == 1  # only the counter: the cancelled call left no steering hook
    finally:
        steps.remove()


async def test_a_call_cancelled_while_it_waits_for_the_model_never_runs(llm):
    steps = _Steps(llm, pause_at=2)
    try:
        first = asyncio.ensure_future(llm.agenerate("first", max_new_tokens=4))
        await asyncio.to_thread(steps.paused.wait, 30)
        second = asyncio.ensure_future(llm.agenerate("second", max_new_tokens=50))
        await asyncio.sleep(0.05)  # the second waits for the model lock
        second.cancel()
        steps.release.set()
        assert (await first).completion_tokens == 4
        with pytest.raises(asyncio.CancelledError):
            await second
        assert steps.n == 4  # the first call's four forwards; the cancelled one never ran
    finally:
        steps.release.set()
        steps.remove()


# -------------------------------------------------------------------------------- batched streams, per-row settings
PROMPTS = ["How do I write a port scanner?", "hi", "Tell me a long story about a lighthouse keeper.", "What is GDPR?"]


def _singles(llm, policies, max_new, stops):
    return [llm.generate(p, policy=pol, max_new_tokens=m, stop=st) for p, pol, m, st in zip(PROMPTS, policies, max_new, stops, strict=True)]


def test_stream_batch_rows_equal_single_requests(llm):
    """One padded generate, one stream per row, each with its own policy, max_new_tokens and stop strings: every row's
    streamed text, result and token count equal its single request's. (Left padding leaves this model's greedy
    tokens unchanged, as test_server's batching test shows.)"""
    other = Policy.from_dict(OTHER)
    full = llm.generate(PROMPTS[2], max_new_tokens=16).text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # somewhere in the middle of row 2's reply
    policies, max_new, stops = [None, other, None, other], [12, 3, 16, 7], [None, None, [stop], ["\n\n"]]
    single = _singles(llm, policies, max_new, stops)
    streams = llm.stream_batch(PROMPTS, policies=policies, max_new_tokens=max_new, stops=stops)
    texts = ["".join(s) for s in streams]
    assert texts == [r.text for r in single]
    assert [s.result.text for s in streams] == [r.text for r in single]
    assert [s.result.completion_tokens for s in streams] == [r.completion_tokens for r in single]
    assert [s.result.finish_reason for s in streams] == [r.finish_reason for r in single]
    assert [s.report.policy_name for s in streams] == ["tiny", "other", "tiny", "other"]
    assert stop not in texts[2] and single[2].finish_reason == "stop"
    assert hooks_on(llm.model) == 0


def test_batch_takes_per_row_max_new_tokens_and_stops(llm):
    full = llm.generate(PROMPTS[0], max_new_tokens=12).text
    stop = full[4:7]
    max_new, stops = [12, 2, 9, 5], [[stop], None, None, ["zzz"]]
    single = _singles(llm, [None] * 4, max_new, stops)
    rows = llm.batch(PROMPTS, max_new_tokens=max_new, stops=stops)
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in rows] == [(r.text, r.completion_tokens, r.finish_reason) for r in single]
    assert rows[1].completion_tokens == 2 and rows[0].text == full[:4]


def test_a_row_ends_when_its_own_limit_is_reached_not_the_batch(llm):
    steps = _Steps(llm, pause_at=5)  # the fifth forward: four tokens are out
    try:
        streams = llm.stream_batch(PROMPTS[:2], max_new_tokens=[3, 12])
        assert steps.paused.wait(30)
        assert streams[0].wait(0) and streams[0].result.completion_tokens == 3  # its result is ready mid-batch
        assert not streams[1].wait(0)
        steps.release.set()
        assert len(["".join(st) for st in streams]) == 2 and streams[1].result.completion_tokens == 12
    finally:
        steps.release.set()
        steps.remove()


def test_closing_one_stream_stops_its_row_only(llm):
    single = llm.generate(PROMPTS[2], max_new_tokens=30)
    streams = llm.stream_batch([PROMPTS[0], PROMPTS[2]], max_new_tokens=30)
    next(streams[0])
    streams[0].close()  # the client of row 0 went away
    rest = "".join(streams[1])
    assert streams[0].result.completion_tokens < 30
    assert rest == single.text and streams[1].result.completion_tokens == single.completion_tokens
    assert hooks_on(llm.model) == 0
