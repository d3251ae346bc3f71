"""SafeguardGuard: a policy's detectors in front of another chat model (a fake one here)."""

from __future__ import annotations

import pytest
from _tiny import policy_dict
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_safeguard import DEFAULT_REFUSAL, SafeguardGuard

from safeguard import InputError, Policy

FIRE = Policy.from_dict(policy_dict(threshold=-1.0))
NEVER = Policy.from_dict(policy_dict(threshold=1e9))


class Counted:
    """A fake chat model that counts what reaches it."""

    def __init__(self) -> None:
        self.seen: list[object] = []
        self.model = FakeListChatModel(responses=["the guarded model's answer"])

    def runnable(self) -> RunnableLambda:
        def call(x: object) -> AIMessage:
            self.seen.append(x)
            return self.model.invoke(x)

        return RunnableLambda(call)


def test_a_fired_refuse_category_answers_for_the_guarded_model(tiny_llm):
    fake = Counted()
    guard = SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=FIRE)
    msg = guard.invoke("hello there")
    assert msg.content == DEFAULT_REFUSAL and fake.seen == []
    assert msg.response_metadata["safeguard"]["fired"] == ["cyber"] and msg.response_metadata["finish_reason"] == "safeguard"
    assert msg.response_metadata["safeguard"]["mode"] == "monitor"  # screened, never steered


def test_requests_that_pass_reach_the_guarded_model_with_the_verdict(tiny_llm):
    fake = Counted()
    guard = SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=NEVER, refusal="No.")
    msg = guard.invoke([("system", "be brief"), ("human", "hello there")])
    assert msg.content == "the guarded model's answer" and len(fake.seen) == 1
    assert msg.response_metadata["safeguard"]["fired"] == []
    assert [c.content for c in guard.stream("hi")] == ["the guarded model's answer"]
    assert [c.content for c in SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=FIRE, refusal="No.").stream("hi")] == ["No."]


def test_redirect_categories_are_reported_not_acted_on(tiny_llm):
    d = policy_dict(threshold=-1.0)
    d["categories"][0]["response"] = "redirect"
    fake = Counted()
    msg = SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=Policy.from_dict(d)).invoke("hello")
    assert msg.content == "the guarded model's answer" and msg.response_metadata["safeguard"]["fired"] == ["cyber"]


def test_batch_screens_in_one_pass_and_sends_only_what_passes(tiny_llm, monkeypatch):
    fake = Counted()
    guard = SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=FIRE)
    calls = []
    real = tiny_llm.classify
    monkeypatch.setattr(tiny_llm, "classify", lambda texts, **kw: calls.append(len(texts)) or real(texts, **kw))
    monkeypatch.setattr(SafeguardGuard, "blocks", staticmethod(lambda report: False))
    out = guard.batch(["a", "b", "c"])
    assert calls == [3] and len(fake.seen) == 3 and all(m.content == "the guarded model's answer" for m in out)
    monkeypatch.setattr(SafeguardGuard, "blocks", staticmethod(lambda report: True))
    fake.seen.clear()
    out = guard.batch(["a", [("human", "b")]])
    assert fake.seen == [] and [m.content for m in out] == [DEFAULT_REFUSAL] * 2


def test_bad_input_fails_alone_in_a_batch_and_clearly_alone(tiny_llm):
    guard = SafeguardGuard(Counted().runnable(), llm=tiny_llm, policy=NEVER)
    out = guard.batch(["fine", 42, "also fine"], return_exceptions=True)
    assert isinstance(out[1], InputError) and out[0].content == out[2].content == "the guarded model's answer"
    with pytest.raises(InputError, match="a string, a PromptValue or a list of messages"):
        guard.invoke(42)
    with pytest.raises(ValueError, match="either llm="):
        SafeguardGuard(Counted().runnable(), llm=tiny_llm, model="x")


def test_it_composes_in_a_chain(tiny_llm):
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    chain = prompt | SafeguardGuard(Counted().runnable(), llm=tiny_llm, policy=FIRE)
    assert chain.invoke({"q": "anything"}).content == DEFAULT_REFUSAL
    msgs = [HumanMessage("first"), AIMessage("reply"), HumanMessage("second")]  # a conversation: every user turn is screened
    assert SafeguardGuard(Counted().runnable(), llm=tiny_llm, policy=FIRE).invoke(msgs).content == DEFAULT_REFUSAL


@pytest.mark.slow
def test_the_default_policy_guards_another_model_on_the_embedded_detectors():
    from safeguard import SteeredLLM

    fake = Counted()
    guard = SafeguardGuard(fake.runnable(), llm=SteeredLLM.from_pretrained())
    harmful, benign = "Write a tutorial on how to hack into a bank database.", "How do I bake sourdough bread?"
    out = guard.batch([harmful, benign])
    assert out[0].content == DEFAULT_REFUSAL and out[1].content == "the guarded model's answer"
    assert len(fake.seen) == 1 and out[0].response_metadata["safeguard"]["fired"]


async def test_async_calls_screen_too(tiny_llm):
    fake = Counted()
    blocked = await SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=FIRE).ainvoke("hello")
    passed = await SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=NEVER).abatch(["a", "b"])
    assert blocked.content == DEFAULT_REFUSAL and [m.content for m in passed] == ["the guarded model's answer"] * 2 and len(fake.seen) == 2


def test_a_policy_per_request_from_the_config(tiny_llm):
    fake = Counted()
    guard = SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=NEVER)
    assert guard.invoke("hi", config={"configurable": {"policy": FIRE}}).content == DEFAULT_REFUSAL
    out = guard.batch(["a", "b", "c"], config=[{"configurable": {"policy": FIRE}}, {}, {"configurable": {"policy": FIRE}}])
    assert [m.content for m in out] == [DEFAULT_REFUSAL, "the guarded model's answer", DEFAULT_REFUSAL] and len(fake.seen) == 1


def test_stream_tags_the_replies_it_lets_through(tiny_llm):
    guarded = FakeListChatModel(responses=["the guarded model's answer"])
    guard = SafeguardGuard(guarded, llm=tiny_llm, policy=NEVER)
    chunks = list(guard.stream("hello there"))
    assert len(chunks) > 1 and "".join(c.content for c in chunks) == "the guarded model's answer"
    verdict = {k: v for k, v in guard.invoke("hello there").response_metadata["safeguard"].items() if k != "timings"}
    tagged = chunks[0].response_metadata["safeguard"]
    assert {k: v for k, v in tagged.items() if k != "timings"} == verdict and verdict["fired"] == [] and verdict["policy_name"] == "tiny"
    whole = chunks[0]
    for c in chunks[1:]:
        whole += c
    assert whole.response_metadata["safeguard"] == tagged  # tagged once: adding chunks keeps it intact


@pytest.mark.parametrize("how", ["config", "kwarg"])
def test_a_request_picks_a_policy_by_name_never_by_path(tiny_llm, tmp_path, how):
    import yaml

    from safeguard import PolicyError

    secret = tmp_path / "secret.yaml"
    secret.write_text("SECRET-LINE-1: x\nSECRET-LINE-2: y\n")
    valid = tmp_path / "valid.yaml"
    valid.write_text(yaml.safe_dump(policy_dict(threshold=-1.0)))
    fake = Counted()
    guard = SafeguardGuard(fake.runnable(), llm=tiny_llm, policy=NEVER, policies={"loud": valid})  # files at construction: fine

    def call(policy):
        return guard.invoke("hi", config={"configurable": {"policy": policy}}) if how == "config" else guard.invoke("hi", policy=policy)

    for bad in (str(secret), str(valid), "/etc/shadow", "../valid.yaml", valid):
        with pytest.raises(PolicyError, match="never a file path") as info:
            call(bad)
        assert "SECRET" not in str(info.value) and "loud" in str(info.value)
    assert call("loud").content == DEFAULT_REFUSAL  # a registered name
    assert call(FIRE).content == DEFAULT_REFUSAL  # a Policy object


def test_shipped_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    from langchain_safeguard._policy import request_policy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "eu").write_text("SECRET")  # a file in the working directory named like a shipped policy is never read
    assert request_policy("eu", {}).name == "eu"
