"""LangChain receives a block as the AIMessage, with the report attached; shadow decisions travel in the report."""

from __future__ import annotations

import pytest
from _tiny import policy_v2, write_tiny_pack
from langchain_core.messages import HumanMessage
from langchain_safeguard import ChatSafeguard

from safeguard import Policy, SteeredLLM

BLOCK = "Blocked by policy."


@pytest.fixture
def packed(tiny_llm, tmp_path):
    return SteeredLLM(tiny_llm._loaded, tiny_llm.saes, None, pack=write_tiny_pack(tmp_path / "pack"))


def test_block_is_the_ai_message_with_its_report(packed):
    blocking = Policy.from_dict({**policy_v2(cyber={"response": "block"}), "defaults": {"message": BLOCK}})
    chat = ChatSafeguard(llm=packed, policy=blocking, max_tokens=6)
    msg = chat.invoke([HumanMessage("hello there")])
    assert msg.content == BLOCK
    report = msg.response_metadata["safeguard"]
    assert report["action"] == "block" and report["message"] == BLOCK and report["fired"] == ["cyber"]
    chunks = list(chat.stream("hello there"))
    assert "".join(c.content for c in chunks) == BLOCK


def test_shadow_decisions_reach_langchain(packed, tmp_path):
    import yaml

    (tmp_path / "loud.yaml").write_text(yaml.safe_dump({**policy_v2(cyber={"response": "block"}), "name": "loud"}))
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text(yaml.safe_dump({**policy_v2(cyber={"sensitivity": "relaxed"}), "shadow": ["loud.yaml"]}))
    plain = packed.generate("hello there", steer=False, max_new_tokens=4)
    msg = ChatSafeguard(llm=packed, policy=Policy.load(quiet), max_tokens=4).invoke("hello there")
    assert msg.content == plain.text  # the shadow decided to block, and nothing was done
    (shadow,) = msg.response_metadata["safeguard"]["shadow"]
    assert shadow["policy_name"] == "loud" and shadow["action"] == "block" and shadow["fired"] == ["cyber"]


def test_the_guard_answers_a_block_with_its_message(packed):
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_safeguard import SafeguardGuard

    guarded = FakeListChatModel(responses=["the guarded model's answer"])
    guard = SafeguardGuard(guarded, policy=Policy.from_dict({**policy_v2(cyber={"response": "block", "message": BLOCK})}), llm=packed)
    msg = guard.invoke("hello there")
    assert msg.content == BLOCK and msg.response_metadata["safeguard"]["fired"] == ["cyber"]
    passes = SafeguardGuard(guarded, policy=Policy.from_dict(policy_v2(cyber={"sensitivity": "relaxed"})), llm=packed)
    assert passes.invoke("hello there").content == "the guarded model's answer"
