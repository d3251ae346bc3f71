"""OpenTelemetry spans with the SDK's in-memory exporter: one per reply, classify call and server request, GenAI
attributes plus safeguard's decision, no prompt text; a no-op without opentelemetry."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

PROMPT = "a secret prompt about port scanners"
_exporter = InMemorySpanExporter()


@pytest.fixture
def spans():
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # the global provider can be set once per process
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def _no_prompt(span) -> None:
    assert not any(PROMPT in str(v) for v in span.attributes.values())


def test_one_span_per_reply_with_genai_and_safeguard_attributes(llm, spans):
    r = llm.generate(PROMPT, max_new_tokens=4)
    [s] = spans.get_finished_spans()
    a = s.attributes
    assert s.name == "chat tiny-llama"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "tiny-llama" and a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == r.prompt_tokens and a["gen_ai.usage.output_tokens"] == r.completion_tokens
    assert tuple(a["gen_ai.response.finish_reasons"]) == (r.finish_reason,)
    assert a["safeguard.policy.name"] == "tiny" and a["safeguard.policy.hash"] == r.report.policy_hash
    assert tuple(a["safeguard.fired"]) == ("cyber",) and a["safeguard.action"] == r.report.action
    _no_prompt(s)


def test_chat_stream_batch_and_classify_spans(llm, spans):
    llm.chat([{"role": "user", "content": PROMPT}], max_new_tokens=2)
    "".join(llm.stream(PROMPT, max_new_tokens=3))
    llm.batch([PROMPT, "hi"], max_new_tokens=[2, 3])
    llm.classify([PROMPT])
    got = spans.get_finished_spans()
    assert [s.name for s in got] == ["chat tiny-llama"] * 4 + ["classify tiny-llama"]
    assert [s.attributes["gen_ai.usage.output_tokens"] for s in got[:4]] == [2, 3, 2, 3]
    assert tuple(got[4].attributes["safeguard.fired"]) == ("cyber",) and got[4].attributes["safeguard.action"] == "monitor"
    for s in got:
        _no_prompt(s)


def test_server_request_span_parents_the_reply_span(llm, spans):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from safeguard.server import create_app

    with TestClient(create_app(llm)) as client:
        r = client.post("/v1/chat/completions", json={"model": "safeguard", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3})
        assert r.status_code == 200
        r = client.post("/v1/chat/completions", json={"model": "safeguard", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2,
                                                      "stream": True})
        assert r.status_code == 200
    got = spans.get_finished_spans()
    ours = [s for s in got if s.instrumentation_scope.name == "safeguard"]  # (an installed ASGI instrumentation may add its own)
    servers = [s for s in ours if s.kind == trace.SpanKind.SERVER]
    rows = [s for s in ours if s.kind == trace.SpanKind.INTERNAL]
    assert [s.name for s in servers] == ["chat safeguard/default"] * 2 and len(rows) == 2
    for server, row in zip(servers, rows, strict=True):
        assert row.parent is not None and row.parent.span_id == server.context.span_id
        assert server.attributes["http.response.status_code"] == 200 and server.attributes["safeguard.policy.name"] == "tiny"
    assert [s.attributes["gen_ai.usage.output_tokens"] for s in servers] == [3, 2]
    for s in ours:
        _no_prompt(s)


def test_without_opentelemetry_spans_are_no_ops(llm, monkeypatch):
    import safeguard.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_trace", None)
    monkeypatch.setattr(telemetry, "_context", None)
    assert llm.generate(PROMPT, max_new_tokens=2).completion_tokens == 2
    with telemetry.span("chat", "m") as s:
        s.record_result(llm.generate(PROMPT, max_new_tokens=1))
    assert telemetry.current_context() is None and telemetry.context_of(s) is None
