"""ChatSafeguard on a tiny random Llama: messages, reports, per-request policies, events, batching, loading."""

from __future__ import annotations

import time
from typing import Any

import langchain_safeguard._loading as loading
import pytest
import yaml
from _embedded import same_model
from _tiny import hooks_on, policy_dict
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableParallel
from langchain_safeguard import REPORT_EVENT, ChatSafeguard
from langchain_safeguard._convert import report_dict

from safeguard import InputError, Policy, PolicyError, SteeredLLM

FIRE = Policy.from_dict(policy_dict(threshold=-1.0))
NEVER = Policy.from_dict(policy_dict(threshold=1e9))
MAX = 6


def without_timings(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "timings"}


def expected(llm: SteeredLLM, prompt: Any, policy: Any = None, **kw: Any):
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return llm.chat(messages, policy=policy, max_new_tokens=MAX, **kw)


@pytest.fixture
def chat(tiny_llm):
    return ChatSafeguard(llm=tiny_llm, max_tokens=MAX)


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.reports: list[tuple[Any, dict[str, Any]]] = []
        self.llm_runs: list[Any] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any, **kw: Any) -> None:
        self.llm_runs.append(run_id)

    def on_custom_event(self, name: str, data: Any, *, run_id: Any, **kw: Any) -> None:
        if name == REPORT_EVENT:
            self.reports.append((run_id, data))


class AsyncEvents(AsyncCallbackHandler, Events):
    async def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any, **kw: Any) -> None:
        self.llm_runs.append(run_id)

    async def on_custom_event(self, name: str, data: Any, *, run_id: Any, **kw: Any) -> None:
        if name == REPORT_EVENT:
            self.reports.append((run_id, data))


# ------------------------------------------------------------------------------------------ replies
def test_invoke_is_steered_llm_chat_with_report_and_usage(chat, tiny_llm):
    msg = chat.invoke("hello there")
    ref = expected(tiny_llm, "hello there")
    assert msg.content == ref.text
    meta = msg.response_metadata
    assert meta["model_name"] == "tiny-llama" and meta["finish_reason"] == ref.finish_reason
    assert without_timings(meta["safeguard"]) == without_timings(report_dict(ref.report))
    assert meta["safeguard"]["decisions"][0]["category"] == "cyber" and meta["safeguard"]["applied"][0]["kind"] == "add"
    assert meta["safeguard"]["fired"] == ["cyber"] and meta["safeguard"]["policy_name"] == "tiny"
    assert msg.usage_metadata == {"input_tokens": ref.prompt_tokens, "output_tokens": ref.completion_tokens,
                                  "total_tokens": ref.prompt_tokens + ref.completion_tokens}


def test_multi_turn_history_goes_through_the_chat_template(chat, tiny_llm):
    history = [SystemMessage("You are terse."), HumanMessage("hi"), AIMessage("hello"), HumanMessage("how are you")]
    ref = expected(tiny_llm, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}])
    assert chat.invoke(history).content == ref.text
    assert chat.invoke([("system", "You are terse."), ("human", "hi"), ("ai", "hello"), ("human", "how are you")]).content == ref.text


def test_text_blocks_are_joined_and_repeated_roles_merged(chat, tiny_llm):
    blocks = HumanMessage(content=[{"type": "text", "text": "hello"}, "there"])
    ref = expected(tiny_llm, [{"role": "user", "content": "hello\nthere\n\nagain"}])
    assert chat.invoke([blocks, HumanMessage("again")]).content == ref.text


@pytest.mark.parametrize(("messages", "match"), [
    ([HumanMessage(content=[{"type": "image", "url": "https://x/y.png"}])], r"content\[0\] is a 'image' block; ChatSafeguard reads text only"),
    ([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")], "role 'tool' is not supported"),
    ([HumanMessage("hi"), SystemMessage("late")], "a system message may only open the conversation"),
    ([HumanMessage("hi"), AIMessage("hello")], "the last message must be a human message"),
    ([AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}]), HumanMessage("x")], "carries tool calls"),
])
def test_unsupported_messages_fail_with_a_clear_error(chat, messages, match):
    with pytest.raises(InputError, match=match):
        chat.invoke(messages)


def test_unknown_and_model_arguments_are_refused(chat):
    with pytest.raises(InputError, match=r"unknown argument\(s\) \['temprature'\]"):
        chat.invoke("hi", temprature=0.5)
    with pytest.raises(InputError, match="one model per instance"):
        chat.invoke("hi", model="gpt-4o")
    with pytest.raises(InputError, match="tool calling"):
        chat.invoke("hi", tools=[])


def test_stop_cuts_the_reply(chat, tiny_llm):
    full = chat.invoke("hello there", max_tokens=12).content
    assert len(full) > 3
    stop = full[2:4]
    assert chat.invoke("hello there", max_tokens=12, stop=[stop]).content == full[: full.index(stop)]
    assert ChatSafeguard(llm=tiny_llm, max_tokens=12, stop=[stop]).invoke("hello there").content == full[: full.index(stop)]


def test_steer_false_answers_unsteered(chat, tiny_llm):
    msg = chat.invoke("hello there", steer=False)
    assert msg.content == tiny_llm.generate("hello there", steer=False, max_new_tokens=MAX).text
    assert msg.response_metadata["safeguard"]["mode"] == "off"


# ---------------------------------------------------------------------------------------- streaming
def test_stream_is_token_by_token_and_ends_with_the_report(chat, tiny_llm):
    chunks = list(chat.stream("hello there"))
    ref = expected(tiny_llm, "hello there")
    assert "".join(c.content for c in chunks) == ref.text
    assert len(chunks) >= 3 and all(c.chunk_position is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.chunk_position == "last" and last.content == ""
    assert last.response_metadata["safeguard"]["fired"] == ["cyber"]
    assert last.usage_metadata["output_tokens"] == ref.completion_tokens
    assert all(c.usage_metadata is None and "safeguard" not in c.response_metadata for c in chunks[:-1])


def test_stream_closed_early_leaves_no_hooks(chat, tiny_llm):
    it = chat.stream("hello there", max_tokens=50)
    next(it)
    it.close()
    assert hooks_on(tiny_llm.model) == 0
    assert chat.invoke("hello there").content == expected(tiny_llm, "hello there").text


async def test_async_variants_match_sync(chat, tiny_llm):
    ref = expected(tiny_llm, "hello there", policy=NEVER)
    assert (await chat.ainvoke("hello there", policy=NEVER)).content == ref.text
    chunks = [c async for c in chat.astream("hello there", policy=NEVER)]
    assert "".join(c.content for c in chunks) == ref.text and chunks[-1].chunk_position == "last"
    assert chunks[-1].response_metadata["safeguard"]["fired"] == []
    out = await chat.abatch(["hello there", "hello there"], config=[{}, {"configurable": {"policy": NEVER}}])
    assert out[1].content == ref.text and out[0].content == expected(tiny_llm, "hello there").text


def test_streaming_true_makes_invoke_stream_to_callbacks(tiny_llm):
    tokens: list[str] = []

    class Tokens(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kw: Any) -> None:
            tokens.append(token)

    msg = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, streaming=True).invoke("hello there", config={"callbacks": [Tokens()]})
    assert "".join(tokens) == msg.content and len(tokens) >= 3
    assert msg.response_metadata["safeguard"]["fired"] == ["cyber"]


# ------------------------------------------------------------------------------ per-request policy
def test_policy_per_call_bind_config_and_field(tiny_llm, tmp_path):
    path = tmp_path / "never.yaml"
    path.write_text(yaml.safe_dump(policy_dict(threshold=1e9)))
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, policies={"never": path})  # files are registered at construction
    never, fire = expected(tiny_llm, "hello there", policy=NEVER).text, expected(tiny_llm, "hello there").text
    assert never != fire
    assert chat.invoke("hello there", policy="never").content == never
    assert chat.bind(policy="never").invoke("hello there").content == never
    assert chat.bind(policy=Policy.load(path)).invoke("hello there").content == never
    assert chat.with_config(configurable={"policy": "never"}).invoke("hello there").content == never
    assert chat.invoke("hello there", config={"configurable": {"policy": NEVER}}).content == never
    assert ChatSafeguard(llm=tiny_llm, max_tokens=MAX, policy=NEVER).invoke("hello there").content == never
    assert ChatSafeguard(llm=tiny_llm, max_tokens=MAX, policy=path).invoke("hello there").content == never  # a developer's path
    # an explicit policy= wins over configurable, which wins over the field
    assert chat.invoke("hello there", policy=FIRE, config={"configurable": {"policy": NEVER}}).content == fire
    assert ChatSafeguard(llm=tiny_llm, max_tokens=MAX, policy=FIRE).invoke("hello there", config={"configurable": {"policy": NEVER}}).content == never


def test_a_request_never_names_a_policy_file(chat, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("SECRET-LINE-1: x\nSECRET-LINE-2: y\n")
    valid = tmp_path / "valid.yaml"
    valid.write_text(yaml.safe_dump(policy_dict(threshold=1e9)))
    for bad in (str(secret), str(valid), valid, "/etc/shadow", "../never.yaml"):
        for call in (lambda p: chat.invoke("hello there", policy=p), lambda p: chat.bind(policy=p).invoke("hello there"),
                     lambda p: chat.invoke("hello there", config={"configurable": {"policy": p}}),
                     lambda p: list(chat.stream("hello there", config={"configurable": {"policy": p}}))):
            with pytest.raises(PolicyError, match="never a file path") as info:
                call(bad)
            assert "SECRET" not in str(info.value)
    out = chat.batch(["hello there", "hi"], config=[{"configurable": {"policy": str(secret)}}, {}], return_exceptions=True)
    assert isinstance(out[0], PolicyError) and not isinstance(out[1], Exception)  # the bad row fails alone


def test_configurable_policy_inside_a_chain(chat, tiny_llm):
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert chain.invoke({"question": "hello there"}, config={"configurable": {"policy": NEVER}}) == expected(tiny_llm, messages, policy=NEVER).text
    assert chain.invoke({"question": "hello there"}) == expected(tiny_llm, messages).text
    streamed = "".join(chain.stream({"question": "hello there"}, config={"configurable": {"policy": NEVER}}))
    assert streamed == expected(tiny_llm, messages, policy=NEVER).text
    # LangChain's ConfigurableField route works too (it rebuilds the model, sharing the loaded SteeredLLM)
    configurable = chat.configurable_fields(policy=ConfigurableField(id="policy"))
    assert (prompt | configurable | StrOutputParser()).invoke({"question": "hello there"}, config={"configurable": {"policy": NEVER}}) \
        == expected(tiny_llm, messages, policy=NEVER).text


def test_a_bad_policy_file_fails_at_first_use_with_the_file_named(tiny_llm, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**policy_dict(), "categories": "nope"}))
    with pytest.raises(PolicyError, match="bad.yaml"):
        ChatSafeguard(llm=tiny_llm, max_tokens=MAX, policies={"bad": bad}).invoke("hello there", policy="bad")


# ------------------------------------------------------------------------------------ report events
def test_every_path_emits_the_report_event_on_the_chat_model_run(chat, tiny_llm):
    h = Events()
    cfg = {"callbacks": [h]}
    chat.invoke("hello there", config=cfg)
    list(chat.stream("hello there", config=cfg))
    chat.batch(["hello there", "hi"], config=cfg)
    ChatSafeguard(llm=tiny_llm, max_tokens=MAX, streaming=True).invoke("hello there", config=cfg)
    list(chat.stream_events("hello there", version="v3", config=cfg))
    list(ChatSafeguard(llm=tiny_llm, max_tokens=MAX, disable_streaming=True).stream("hello there", config=cfg))  # invoke's path
    assert len(h.reports) == len(h.llm_runs) == 7
    assert sorted(str(run) for run, _ in h.reports) == sorted(map(str, h.llm_runs))  # batch rows end in any order
    assert all(data["fired"] == ["cyber"] and data["policy_name"] == "tiny" for _, data in h.reports)


async def test_async_paths_emit_the_report_event(chat):
    h = AsyncEvents()
    cfg = {"callbacks": [h]}
    await chat.ainvoke("hello there", config=cfg)
    [c async for c in chat.astream("hello there", config=cfg)]
    await chat.abatch(["hello there", "hi"], config=cfg)
    [c async for c in chat.model_copy(update={"disable_streaming": True}).astream("hello there", config=cfg)]  # ainvoke's path
    assert len(h.reports) == len(h.llm_runs) == 5 and sorted(str(r) for r, _ in h.reports) == sorted(map(str, h.llm_runs))


async def test_astream_events_shows_the_report(chat):
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | chat
    events = [e async for e in chain.astream_events({"q": "hello there"}, version="v2")]
    custom = [e for e in events if e["event"] == "on_custom_event" and e["name"] == REPORT_EVENT]
    [model_run] = [e["run_id"] for e in events if e["event"] == "on_chat_model_start"]
    assert len(custom) == 1 and custom[0]["run_id"] == model_run and custom[0]["data"]["fired"] == ["cyber"]


# ----------------------------------------------------------------------------- public entry points
# Every way LangChain runs a chat model, given nothing but a config: the request's policy comes from
# config["configurable"]["policy"], and each run sends exactly one report event, on the chat model's run.
Q = "hello there"


def _reply(msg: Any) -> tuple[str, dict[str, Any]]:
    return msg.text, msg.response_metadata["safeguard"]


def _chunks(chunks: list[Any]) -> tuple[str, dict[str, Any]]:
    assert chunks[-1].chunk_position == "last" and all("safeguard" not in c.response_metadata for c in chunks[:-1])
    return "".join(c.content for c in chunks), chunks[-1].response_metadata["safeguard"]


def _v3(stream: Any) -> tuple[str, dict[str, Any]]:
    for _ in stream:
        pass
    return _reply(stream.output)


def _streaming(chat: ChatSafeguard) -> ChatSafeguard:
    """The same model with ``streaming=True``: invoke generates through ``_stream`` (LangChain gives it no run manager)."""
    return ChatSafeguard(llm=chat.llm, max_tokens=MAX, policies=chat.policies, streaming=True)


ROUTES = {
    "invoke": lambda chat, cfg: _reply(chat.invoke(Q, config=cfg)),
    "invoke streaming=True": lambda chat, cfg: _reply(_streaming(chat).invoke(Q, config=cfg)),
    "stream": lambda chat, cfg: _chunks(list(chat.stream(Q, config=cfg))),
    "batch": lambda chat, cfg: _reply(chat.batch([Q], config=cfg)[0]),
    "stream_events v3": lambda chat, cfg: _v3(chat.stream_events(Q, version="v3", config=cfg)),
}


async def _ainvoke(chat: ChatSafeguard, cfg: Any) -> tuple[str, dict[str, Any]]:
    return _reply(await chat.ainvoke(Q, config=cfg))


async def _ainvoke_streaming(chat: ChatSafeguard, cfg: Any) -> tuple[str, dict[str, Any]]:
    return _reply(await _streaming(chat).ainvoke(Q, config=cfg))


async def _astream(chat: ChatSafeguard, cfg: Any) -> tuple[str, dict[str, Any]]:
    return _chunks([c async for c in chat.astream(Q, config=cfg)])


async def _abatch(chat: ChatSafeguard, cfg: Any) -> tuple[str, dict[str, Any]]:
    return _reply((await chat.abatch([Q], config=cfg))[0])


async def _astream_events_v3(chat: ChatSafeguard, cfg: Any) -> tuple[str, dict[str, Any]]:
    stream = await chat.astream_events(Q, version="v3", config=cfg)
    async for _ in stream:
        pass
    return _reply(await stream.output)


AROUTES = {"ainvoke": _ainvoke, "ainvoke streaming=True": _ainvoke_streaming, "astream": _astream, "abatch": _abatch,
           "astream_events v3": _astream_events_v3}
POLICIES = [("eu", NEVER), (NEVER, NEVER), (FIRE, FIRE), (None, None)]  # (config's policy, the policy it stands for)


@pytest.fixture
def eu_chat(tiny_llm):
    """``"eu"`` registered as the never-firing policy (a registered name wins over the shipped policy of that name)."""
    return ChatSafeguard(llm=tiny_llm, max_tokens=MAX, policies={"eu": NEVER})


def _check_run(tiny_llm: SteeredLLM, got: tuple[str, dict[str, Any]], events: Events, policy: Policy | None) -> None:
    ref = expected(tiny_llm, Q, policy=policy)
    text, report = got
    assert text == ref.text and without_timings(report) == without_timings(report_dict(ref.report))
    assert report["fired"] == ([] if policy is NEVER else ["cyber"])
    [run] = events.llm_runs
    assert [(r, without_timings(data)) for r, data in events.reports] == [(run, without_timings(report))]  # one event, on the run


def _refused(error: BaseException, bad: Any) -> None:
    from safeguard.runtime.policy import shipped_policies

    assert isinstance(error, PolicyError) and "never a file path" in str(error)
    assert f"by name ({', '.join(sorted({'eu', *shipped_policies()}))})" in str(error)  # names what would have worked
    if bad == "no-such-policy":
        assert "'no-such-policy'" in str(error)


@pytest.mark.parametrize(("policy", "means"), POLICIES, ids=["name", "Policy", "other Policy", "none"])
@pytest.mark.parametrize("route", ROUTES)
def test_configurable_policy_and_one_report_event_on_every_route(eu_chat, tiny_llm, route, policy, means):
    h = Events()
    got = ROUTES[route](eu_chat, {"callbacks": [h], "configurable": {} if policy is None else {"policy": policy}})
    _check_run(tiny_llm, got, h, means)


@pytest.mark.parametrize(("policy", "means"), POLICIES, ids=["name", "Policy", "other Policy", "none"])
@pytest.mark.parametrize("route", AROUTES)
async def test_configurable_policy_and_one_report_event_on_every_async_route(eu_chat, tiny_llm, route, policy, means):
    h = AsyncEvents()
    got = await AROUTES[route](eu_chat, {"callbacks": [h], "configurable": {} if policy is None else {"policy": policy}})
    _check_run(tiny_llm, got, h, means)


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_names_and_paths_are_refused_on_every_route(eu_chat, route, tmp_path):
    path = tmp_path / "never.yaml"
    path.write_text(yaml.safe_dump(policy_dict(threshold=1e9)))  # a valid policy file is refused all the same
    for bad in ("no-such-policy", str(path), path):
        h = Events()
        with pytest.raises(PolicyError) as info:
            ROUTES[route](eu_chat, {"callbacks": [h], "configurable": {"policy": bad}})
        _refused(info.value, bad)
        assert h.reports == []


@pytest.mark.parametrize("route", AROUTES)
async def test_unknown_names_and_paths_are_refused_on_every_async_route(eu_chat, route, tmp_path):
    path = tmp_path / "never.yaml"
    path.write_text(yaml.safe_dump(policy_dict(threshold=1e9)))
    for bad in ("no-such-policy", str(path), path):
        h = AsyncEvents()
        with pytest.raises(PolicyError) as info:
            await AROUTES[route](eu_chat, {"callbacks": [h], "configurable": {"policy": bad}})
        _refused(info.value, bad)
        assert h.reports == []


# ----------------------------------------------------------------------------------------- batching
def _count_generate_calls(llm, monkeypatch) -> list[tuple[int, int]]:
    """(rows, largest max_new_tokens) of every shared prefill: a ``model.generate`` call (no batching, or the window
    batcher), or a prefill of rows joining the iteration batcher's running batch (the default)."""
    from safeguard.runtime.continuous import IterationBatcher

    calls: list[tuple[int, int]] = []
    generate = llm.model.generate
    monkeypatch.setattr(llm.model, "generate", lambda *a, **kw: calls.append((kw["input_ids"].shape[0], kw["max_new_tokens"])) or generate(*a, **kw))
    prefill = IterationBatcher._prefill
    monkeypatch.setattr(IterationBatcher, "_prefill", lambda self, rows: calls.append((len(rows), max(r.max_new for r in rows))) or prefill(self, rows))
    return calls


def test_batch_shares_generate_calls_with_a_policy_per_row(tiny_llm, monkeypatch):
    """LangChain's default batch (one invoke per thread) on the engine's batching: the same messages and reports as
    four invokes, from fewer generate calls than four. A wide window makes the grouping certain on a busy machine."""
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, batch_window_ms=300)
    prompts = ["hello there", "a second, longer prompt for padding", "third", "hello there"]
    policies = [NEVER, FIRE, NEVER, FIRE]
    single = [chat.invoke(p, policy=q) for p, q in zip(prompts, policies, strict=True)]
    calls = _count_generate_calls(tiny_llm, monkeypatch)
    out = chat.batch(prompts, config=[{"configurable": {"policy": p}} for p in policies])
    assert len(calls) < 4 and sum(rows for rows, _ in calls) == 4
    assert calls == [(4, MAX)]  # all four rows arrived within the window
    assert [m.content for m in out] == [m.content for m in single]
    assert [without_timings(m.response_metadata["safeguard"]) for m in out] == [without_timings(m.response_metadata["safeguard"]) for m in single]
    assert [m.usage_metadata for m in out] == [m.usage_metadata for m in single]
    assert [m.response_metadata["safeguard"]["fired"] for m in out] == [[], ["cyber"], [], ["cyber"]]
    assert out[0].content != out[3].content
    assert len({m.id for m in out}) == 4


async def test_abatch_shares_generate_calls_too(tiny_llm, monkeypatch):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, batch_window_ms=300)
    prompts = ["hello there", "a second, longer prompt for padding", "third"]
    single = [(await chat.ainvoke(p, policy=q)).content for p, q in zip(prompts, [NEVER, FIRE, None], strict=True)]
    calls = _count_generate_calls(tiny_llm, monkeypatch)
    out = await chat.abatch(prompts, config=[{"configurable": {"policy": p}} for p in (NEVER, FIRE, None)])
    assert [m.content for m in out] == single and len(calls) < 3


def test_batch_rows_equal_one_at_a_time(chat, tiny_llm):
    prompts = ["hello there", "a second, longer prompt for padding", "third"]
    policies = [NEVER, FIRE, None]
    out = chat.batch(prompts, config=[{"configurable": {"policy": p}} for p in policies])
    assert [m.content for m in out] == [chat.invoke(p, policy=q).content for p, q in zip(prompts, policies, strict=True)]


def test_batch_rows_keep_their_own_settings_and_batch_size_caps_a_call(tiny_llm, monkeypatch):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, batch_window_ms=300, batch_size=2)
    calls = _count_generate_calls(tiny_llm, monkeypatch)
    out = chat.batch(["hello there", "hi", "third"], max_tokens=3)
    assert sorted(calls) == [(1, 3), (2, 3)] and all(m.usage_metadata["output_tokens"] <= 3 for m in out)
    assert tiny_llm.batching.max_batch == 2
    # concurrent requests with different max_tokens share a call; each ends at its own limit
    calls.clear()
    both = RunnableParallel(short=chat.bind(max_tokens=2), long=chat.bind(max_tokens=5)).invoke("a b")
    assert calls == [(2, 5)]
    assert both["short"].usage_metadata["output_tokens"] <= 2 and both["long"].usage_metadata["output_tokens"] <= 5
    assert (both["short"].content, both["long"].content) == (chat.invoke("a b", max_tokens=2).content, chat.invoke("a b", max_tokens=5).content)


def test_batching_can_be_left_off(tiny_llm, monkeypatch):
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, batching=False)
    calls = _count_generate_calls(tiny_llm, monkeypatch)
    chat.batch(["hello there", "hi", "third"])
    assert tiny_llm.batching is None and len(calls) == 3


def test_one_bad_row_fails_alone(chat, tiny_llm):
    missing = "no-such-policy"
    inputs = ["hello there", [HumanMessage(content=[{"type": "image", "url": "u"}])], "third", "fourth"]
    configs = [{}, {}, {"configurable": {"policy": missing}}, {}]
    h = Events()
    out = chat.batch(inputs, config=[{**c, "callbacks": [h]} for c in configs], return_exceptions=True)
    assert isinstance(out[1], InputError) and isinstance(out[2], PolicyError) and "'no-such-policy'" in str(out[2])
    assert out[0].content == chat.invoke("hello there").content and out[3].content == chat.invoke("fourth").content
    assert len(h.reports) == 2
    with pytest.raises(InputError, match="reads text only"):
        chat.batch(inputs)
    assert hooks_on(tiny_llm.model) == 0


def test_a_failing_shared_call_is_retried_row_by_row(tiny_llm):
    small = same_model(tiny_llm, FIRE)
    small.context_window = 40  # the long row no longer fits, the short ones do
    chat = ChatSafeguard(llm=small, max_tokens=MAX)
    out = chat.batch(["hi", "word " * 30, "hey"], return_exceptions=True)
    assert isinstance(out[1], InputError) and "context window" in str(out[1])
    assert out[0].content == chat.invoke("hi").content and out[2].content == chat.invoke("hey").content


def test_batch_with_a_cache_falls_back_to_langchains_path(tiny_llm):
    from langchain_core.caches import InMemoryCache

    chat = ChatSafeguard(llm=tiny_llm, max_tokens=MAX, cache=InMemoryCache())
    first = chat.batch(["hello there", "hi"])
    assert [m.content for m in chat.batch(["hello there", "hi"])] == [m.content for m in first]


# ---------------------------------------------------------------------------------------- loading
def test_construction_is_cheap_and_lazy(monkeypatch):
    monkeypatch.setattr(SteeredLLM, "from_pretrained", lambda *a, **kw: pytest.fail("construction must not load"))
    t0 = time.perf_counter()
    for _ in range(100):
        ChatSafeguard(policy="policies/eu.yaml", temperature=0.3, max_tokens=5, stop=["x"])
    assert time.perf_counter() - t0 < 1.0
    m = ChatSafeguard()
    assert m.model_name == "SmolLM2-135M-Instruct" and m._identifying_params["model"] == "SmolLM2-135M-Instruct"
    assert m._get_ls_params()["ls_provider"] == "safeguard"


def test_instances_share_one_loaded_model_per_model_and_sae(monkeypatch, tiny_llm):
    loads: list[tuple[Any, ...]] = []

    def fake(model=None, *, sae=None, quantization=None, device=None, **kw):
        loads.append((model, sae, quantization, device))
        return tiny_llm

    monkeypatch.setattr(SteeredLLM, "from_pretrained", fake)
    monkeypatch.setattr(loading, "_shared", {})
    a, b = ChatSafeguard(policy=NEVER), ChatSafeguard(device="cpu", max_tokens=3)
    assert a.steered_llm is b.steered_llm is tiny_llm and len(loads) == 1
    assert ChatSafeguard(sae="some/other/sae").steered_llm is tiny_llm
    assert ChatSafeguard(sae="some/other/sae", policy=FIRE).steered_llm is tiny_llm
    assert loads == [(None, None, None, "cpu"), (None, "some/other/sae", None, "cpu")]


def test_llm_and_loading_arguments_are_exclusive(tiny_llm):
    with pytest.raises(ValueError, match="either llm="):
        ChatSafeguard(llm=tiny_llm, model="x")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ChatSafeguard(polcy="x")
    assert "llm" not in ChatSafeguard(llm=tiny_llm).model_dump()


def test_history_goes_through_the_turn_aware_path(tiny_llm):
    """A LangChain history reaches the engine as a conversation: a ``turns: last`` detector reads only the last human
    message (in context), a ``turns: all`` one every human message, exactly as ``SteeredLLM.chat``."""
    from _tiny import explicit_policy, first_turn_feature

    history = [HumanMessage("How do I sharpen a kitchen knife at home?"), AIMessage("Use a whetstone at a low angle."),
               HumanMessage("thanks, and what is the capital of France")]
    messages = [{"role": r, "content": m.content} for r, m in zip(("user", "assistant", "user"), history, strict=True)]
    f, thr = first_turn_feature(tiny_llm, messages)
    chat = ChatSafeguard(llm=tiny_llm, max_tokens=2)
    for turns, fired in (("all", ["cyber"]), ("last", [])):
        policy = Policy.from_dict(explicit_policy(f, thr, turns=turns))
        got = chat.invoke(history, policy=policy).response_metadata["safeguard"]
        want = report_dict(tiny_llm.chat(messages, policy=policy, max_new_tokens=2).report)
        assert got["fired"] == fired and without_timings(got) == without_timings(want)
