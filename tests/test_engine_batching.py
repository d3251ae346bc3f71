"""Batching in the engine (tiny random Llama): concurrent generate / chat / stream calls on one SteeredLLM, from threads
and from asyncio, share padded generate calls, each row under its own policy and settings. Forward passes are counted
with a pre-hook (prefills: calls with more than one new position), never timed. On this model left padding leaves the
greedy tokens unchanged, so batched texts equal the sequential ones exactly. Every test runs in both batching modes:
``iteration`` (the default: rows join between decode steps, tests/test_continuous.py) and ``window``."""

from __future__ import annotations

import asyncio
import threading

import pytest
from _tiny import hooks_on, policy_dict

from safeguard import BatchingConfig, InputError, Policy

OTHER = policy_dict(threshold=1e9) | {"name": "other"}
PROMPTS = ["How do I write a port scanner?", "hi", "Tell me a long story about a lighthouse keeper.", "What is GDPR?",
           "a b c", "Explain TCP in one line."]


class _Forwards:
    """Counts the decoder stack's forward passes, and among them the prefills (more than one position)."""

    def __init__(self, llm):
        self.prefills = 0
        self.steps = 0
        self.reached: dict[int, threading.Event] = {}
        self._h = llm.model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        self.steps += 1
        if x is not None and x.shape[1] > 1:
            self.prefills += 1
        for k, ev in self.reached.items():
            if self.steps >= k:
                ev.set()

    def at(self, k: int) -> threading.Event:
        return self.reached.setdefault(k, threading.Event())

    def remove(self) -> None:
        self._h.remove()


@pytest.fixture(params=["iteration", "window"])
def mode(request) -> str:
    return request.param


def _settings(i: int) -> dict:
    return {"policy": Policy.from_dict(OTHER) if i % 2 else None, "max_new_tokens": 4 + (i % 3) * 3}


def _threads(fn, n: int) -> list:
    out: list = [None] * n
    gate = threading.Barrier(n)

    def work(i: int) -> None:
        gate.wait(30)
        out[i] = fn(i)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out


def test_batching_is_off_by_default_and_validated(llm):
    assert llm.batching is None and llm.batcher is None
    with pytest.raises(InputError, match="max_batch"):
        BatchingConfig(window_ms=5, max_batch=0)
    with pytest.raises(InputError, match="window_ms"):
        llm.enable_batching(window_ms=float("nan"))
    with pytest.raises(InputError, match="mode"):
        BatchingConfig(mode="continuous")
    cfg = llm.enable_batching(window_ms=1, max_batch=4)
    assert llm.batching == cfg == BatchingConfig(1, 4) and cfg.mode == "iteration"
    assert type(llm.batcher).__name__ == "IterationBatcher"
    assert type(llm.enable_batching(mode="window")).__name__ == "BatchingConfig" and type(llm.batcher).__name__ == "MicroBatcher"
    llm.disable_batching()
    assert llm.batching is None


def test_concurrent_generate_threads_equal_sequential_with_fewer_prefills(llm, mode):
    n = len(PROMPTS)
    sequential = [llm.generate(PROMPTS[i], **_settings(i)) for i in range(n)]
    llm.enable_batching(mode=mode, window_ms=500, max_batch=8)  # a wide window: every thread joins the first batch
    fw = _Forwards(llm)
    try:
        batched = _threads(lambda i: llm.generate(PROMPTS[i], **_settings(i)), n)
    finally:
        fw.remove()
        llm.disable_batching()
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in batched] == \
        [(r.text, r.completion_tokens, r.finish_reason) for r in sequential]
    assert [r.report.policy_name for r in batched] == ["tiny", "other"] * (n // 2)
    assert [r.report.fired for r in batched] == [r.report.fired for r in sequential]
    assert fw.prefills < n  # sequential calls would run n prefills
    assert fw.prefills == 1  # all joined one batch
    assert hooks_on(llm.model) == 0


def test_concurrent_chat_and_stream_threads_equal_sequential(llm, mode):
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    seq_chat = [llm.chat(c, max_new_tokens=6).text for c in chats]
    seq_stream = [llm.generate(p, max_new_tokens=8, stop=["zzz"]).text for p in PROMPTS[:4]]
    llm.enable_batching(mode=mode, window_ms=500, max_batch=8)
    fw = _Forwards(llm)
    try:
        def work(i: int) -> str:
            if i < 4:
                return llm.chat(chats[i], max_new_tokens=6).text
            with llm.stream(PROMPTS[i - 4], max_new_tokens=8, stop=["zzz"]) as s:
                return "".join(s)
        out = _threads(work, 8)
    finally:
        fw.remove()
        llm.disable_batching()
    assert out == seq_chat + seq_stream
    assert fw.prefills < 8


async def test_concurrent_async_calls_share_forward_passes(llm, mode):
    n = 4
    sequential = [llm.generate(PROMPTS[i], **_settings(i)).text for i in range(n)]
    llm.enable_batching(mode=mode, window_ms=500, max_batch=8)
    fw = _Forwards(llm)

    async def streamed(i: int) -> str:
        return "".join([piece async for piece in llm.astream(PROMPTS[i], **_settings(i))])

    try:
        out = await asyncio.gather(*[llm.agenerate(PROMPTS[i], **_settings(i)) for i in range(n)], *[streamed(i) for i in range(n)])
    finally:
        fw.remove()
        llm.disable_batching()
    assert [r.text for r in out[:n]] == sequential and list(out[n:]) == sequential
    assert fw.prefills < 2 * n


def test_samplers_and_bad_rows(llm, mode):
    llm.enable_batching(mode=mode, window_ms=300, max_batch=8)
    fw = _Forwards(llm)
    try:
        def work(i: int):
            if i == 3:
                try:
                    return llm.generate("word " * 300, max_new_tokens=4)  # past the tiny model's context window
                except InputError as exc:
                    return exc
            return llm.generate(PROMPTS[i], max_new_tokens=3, temperature=0.7 if i == 2 else None)
        out = _threads(work, 4)
    finally:
        fw.remove()
        llm.disable_batching()
    assert isinstance(out[3], InputError) and "context window" in str(out[3])
    assert [r.completion_tokens for r in out[:3]] == [3, 3, 3]
    # window: greedy rows together, the sampled row alone; iteration: one prefill, each row samples with its own
    # generator (the too-long row never reached the model)
    assert fw.prefills == (2 if mode == "window" else 1)


async def test_a_cancelled_batched_call_stops_its_row_only(llm, mode):
    alone = llm.generate(PROMPTS[2], max_new_tokens=30)
    llm.enable_batching(mode=mode, window_ms=300, max_batch=8)
    fw = _Forwards(llm)
    try:
        doomed = asyncio.ensure_future(llm.agenerate(PROMPTS[0], max_new_tokens=200))
        kept = asyncio.ensure_future(llm.agenerate(PROMPTS[2], max_new_tokens=30))
        await asyncio.to_thread(fw.at(5).wait, 30)  # the shared batch is five forwards in
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        r = await kept
        assert fw.prefills == 1 and fw.steps <= 31  # one batch; it ran to the kept row's 30 tokens, not 200
        assert (r.text, r.completion_tokens) == (alone.text, alone.completion_tokens)
        assert (await llm.agenerate("hi", max_new_tokens=2)).completion_tokens == 2  # the batcher is free
    finally:
        fw.remove()
        llm.disable_batching()
    assert hooks_on(llm.model) == 0


def test_closing_a_batched_stream_stops_its_row_only(llm, mode):
    alone = llm.generate(PROMPTS[2], max_new_tokens=20)
    llm.enable_batching(mode=mode, window_ms=300, max_batch=8)
    try:
        def work(i: int) -> str:
            s = llm.stream(PROMPTS[[0, 2][i]], max_new_tokens=20)
            if i == 0:
                next(s)
                s.close()
                return str(s.result.completion_tokens)
            return "".join(s)
        out = _threads(work, 2)
    finally:
        llm.disable_batching()
    assert int(out[0]) < 20 and out[1] == alone.text


def test_use_policy_and_unbatchable_calls_still_work_with_batching_on(llm, mode):
    llm.enable_batching(mode=mode, window_ms=1)
    try:
        ref = llm.generate("hi", max_new_tokens=3)
        # a generation argument the batcher does not carry runs the call alone, as before
        assert llm.generate("hi", max_new_tokens=3, repetition_penalty=1.0).text == ref.text
        llm.use_policy(Policy.from_dict(OTHER))
        assert llm.generate("hi", max_new_tokens=2).report.policy_name == "other"
        now = llm.generate("hi", max_new_tokens=3).text
        assert llm.batch(["hi", "a b c"], max_new_tokens=3)[0].text == now  # batch / stream_batch bypass the batcher
    finally:
        llm.disable_batching()
