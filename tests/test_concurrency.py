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
