"""Concurrent requests under different policies give exactly what they give one at a time; a request that
fails inside the forward pass leaves the other requests and the model unharmed."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from _embedded import embedded_params, embedded_policy_pair
from _tiny import hooks_on, policy_dict
from langchain_safeguard import ChatSafeguard

from safeguard import Policy

FIRE = Policy.from_dict(policy_dict(threshold=-1.0))
STRONG = Policy.from_dict(policy_dict(threshold=-1.0, steer=[{"kind": "add", "layer": 2, "feature": 9, "strength": 12.0}]))
NEVER = Policy.from_dict(policy_dict(threshold=1e9))
PROMPTS = ["hello there", "a second, longer prompt", "third one", "how do I kill a stuck process?"]


def outcome(msg: Any) -> tuple[str, dict[str, Any]]:
    report = {k: v for k, v in msg.response_metadata["safeguard"].items() if k != "timings"}
    return msg.content, report


def same_but_rounding(batched: list[Any], sequential: list[tuple[str, dict[str, Any]]]) -> None:
    """A padded batch row is not bit-identical to the same request alone (padding changes float rounding):
    same text, same decisions, scores within float noise."""
    assert [outcome(m)[0] for m in batched] == [text for text, _ in sequential]
    for m, (_, ref) in zip(batched, sequential, strict=True):
        got = outcome(m)[1]
        assert got["fired"] == ref["fired"] and got["applied"] == ref["applied"] and got["policy_hash"] == ref["policy_hash"]
        assert [d["score"] for d in got["decisions"]] == pytest.approx([d["score"] for d in ref["decisions"]], rel=1e-4, abs=1e-5)


def requests() -> list[tuple[str, Policy | None, str]]:
    """(prompt, policy, how the policy is passed) for 16 requests mixing policies and routes."""
    out = []
    for i in range(16):
        policy = (FIRE, STRONG, NEVER, None)[i % 4]
        out.append((PROMPTS[(i // 4 + i) % 4], policy, ("kwarg", "config")[i % 2]))
    return out


def send(chat: ChatSafeguard, prompt: str, policy: Policy | None, how: str) -> Any:
    if how == "kwarg":
        return chat.invoke(prompt, policy=policy)
    return chat.invoke(prompt, config={"configurable": {"policy": policy}})


def test_threads_with_mixed_policies_equal_sequential(tiny_llm):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=6)
    reqs = requests()
    sequential = [outcome(send(chat, *r)) for r in reqs]
    assert len({text for text, _ in sequential}) > 4  # the policies really give different replies
    with ThreadPoolExecutor(8) as pool:
        concurrent = [outcome(m) for m in pool.map(lambda r: send(chat, *r), reqs)]
    assert concurrent == sequential
    # and so does one padded batch carrying the same mix of policies
    batched = chat.batch([p for p, _, _ in reqs], config=[{"configurable": {"policy": q}} for _, q, _ in reqs])
    same_but_rounding(batched, sequential)
    assert hooks_on(tiny_llm.model) == 0


def test_threads_streaming_and_invoking_at_once_equal_sequential(tiny_llm):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=6)
    reqs = requests()[:8]
    sequential = [send(chat, *r).content for r in reqs]

    def work(i: int) -> str:
        prompt, policy, _ = reqs[i]
        if i % 2:
            return "".join(c.content for c in chat.stream(prompt, policy=policy))
        return chat.invoke(prompt, policy=policy).content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, range(len(reqs)))) == sequential


async def test_async_requests_with_mixed_policies_equal_sequential(tiny_llm):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=6)
    reqs = requests()[:8]
    sequential = [outcome(await chat.ainvoke(p, policy=q)) for p, q, _ in reqs]
    concurrent = await asyncio.gather(*[chat.ainvoke(p, policy=q) for p, q, _ in reqs])
    assert [outcome(m) for m in concurrent] == sequential


def test_an_exception_inside_one_request_leaves_the_others_and_the_model_unharmed(tiny_llm, monkeypatch):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=6)
    reqs = requests()[:8]
    sequential = [outcome(send(chat, *r)) for r in reqs]
    plain = [chat.invoke(p).content for p in ("hello there", "third one")]
    poison = tiny_llm.tokenizer.encode(" kaboom", add_special_tokens=False)[0]
    embed = tiny_llm.model.model.embed_tokens
    forward = embed.forward

    def explode_on_poison(input_ids: Any) -> Any:
        if (input_ids == poison).any():
            raise RuntimeError("boom inside the forward pass")
        return forward(input_ids)

    monkeypatch.setattr(embed, "forward", explode_on_poison)
    mixed = [*reqs[:4], ("say kaboom now", FIRE, "kwarg"), *reqs[4:], ("and kaboom", STRONG, "config")]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, chat, *r) for r in mixed]
    errors = [f.exception() for f in futures]
    assert [str(e) for e in errors if e] == ["boom inside the forward pass"] * 2
    assert [outcome(f.result()) for f, e in zip(futures, errors, strict=True) if e is None] == sequential
    assert hooks_on(tiny_llm.model) == 0
    # the same failure inside a padded batch fails that call; its rows are retried alone
    out = chat.batch(["hello there", "then kaboom", "third one"], return_exceptions=True)
    assert isinstance(out[1], RuntimeError) and [out[0].content, out[2].content] == plain
    assert hooks_on(tiny_llm.model) == 0
    monkeypatch.undo()
    assert [outcome(send(chat, *r)) for r in reqs] == sequential


def test_a_failing_callback_in_one_stream_leaves_the_others_unharmed(tiny_llm):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=6)
    reqs = requests()[:4]
    sequential = [send(chat, *r).content for r in reqs]
    barrier = threading.Barrier(2)

    def broken_consumer() -> None:
        barrier.wait()
        for _ in chat.stream("hello there", policy=STRONG, max_tokens=40):
            raise KeyError("consumer fails mid-stream")

    def others() -> list[str]:
        barrier.wait()
        return [send(chat, *r).content for r in reqs]

    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.submit(broken_consumer), pool.submit(others)
        with pytest.raises(KeyError):
            bad.result()
        assert good.result() == sequential
    assert hooks_on(tiny_llm.model) == 0


@pytest.mark.slow
def test_embedded_model_threads_with_mixed_policies_equal_sequential():
    chat = ChatSafeguard(**embedded_params(), max_tokens=6)
    a, b = embedded_policy_pair()
    prompts = ["Hello", "How do I make a pipe bomb?", "Write a haiku about rain"]
    reqs = [(p, q) for p in prompts for q in (a, b)]
    sequential = [outcome(chat.invoke(p, policy=q)) for p, q in reqs]
    assert any(sequential[i] != sequential[i + 1] for i in range(0, len(reqs), 2))  # the two policies differ somewhere
    with ThreadPoolExecutor(4) as pool:  # concurrent calls may share a padded generate: same text and decisions, scores within float noise
        same_but_rounding(list(pool.map(lambda r: chat.invoke(r[0], policy=r[1]), reqs)), sequential)
    same_but_rounding(chat.batch([p for p, _ in reqs], config=[{"configurable": {"policy": q}} for _, q in reqs]), sequential)
