"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (``pip install 'safeguard[otel]'``); no-ops otherwise.

One span per reply (each row of ``generate`` / ``chat`` / ``stream`` / ``batch``, from the call until the row ends), one
per ``classify`` call, and one per server request (its parent). Attributes follow the GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.request.max_tokens``, ``gen_ai.request.temperature``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, ``gen_ai.response.finish_reasons``) plus safeguard's
decision (``safeguard.policy.name``, ``safeguard.policy.hash``, ``safeguard.pack.id``, ``safeguard.fired``,
``safeguard.action``). Prompts and replies are never recorded. Spans go to whatever tracer provider the application
configured (none: OpenTelemetry's own no-op).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
except ImportError:  # the optional extra is not installed
    _trace = None
    _context = None

__all__ = ["Span", "attached", "context_of", "current_context", "span", "start_span"]

_SCOPE = "safeguard"


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attributes.items() if v is not None}


class Span:
    """A started span (or nothing, without opentelemetry). ``end`` is idempotent."""

    def __init__(self, span: Any = None):
        self._span = span
        self._ended = False

    def set_attrs(self, attributes: dict[str, Any]) -> None:
        if self._span is not None:
            self._span.set_attributes(_clean(attributes))

    def record_result(self, result: Any) -> None:
        """The usage, finish reason and safeguard decision of a ``GenerationResult``."""
        self.set_attrs({"gen_ai.usage.input_tokens": result.prompt_tokens, "gen_ai.usage.output_tokens": result.completion_tokens,
                        "gen_ai.response.finish_reasons": [result.finish_reason]})
        self.record_report(result.report)

    def record_report(self, report: Any) -> None:
        self.set_attrs({"safeguard.policy.name": report.policy_name, "safeguard.policy.hash": report.policy_hash,
                        "safeguard.pack.id": report.pack_id, "safeguard.fired": list(report.fired), "safeguard.action": report.action})

    def error(self, exc: BaseException) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            self._span.set_attribute("error.type", type(exc).__name__)

    def end(self) -> None:
        if self._span is not None and not self._ended:
            self._ended = True
            self._span.end()


def context_of(s: Span) -> Any:
    """A context whose current span is ``s``: the parent to give spans started for it on other threads."""
    if _trace is None or s._span is None:
        return None
    return _trace.set_span_in_context(s._span)


def current_context() -> Any:
    """The caller's trace context, to parent a span started later on another thread (``None`` without opentelemetry)."""
    return _context.get_current() if _context is not None else None


def start_span(operation: str, model: str, *, parent: Any = None, server: bool = False, attributes: dict[str, Any] | None = None) -> Span:
    """Start ``"{operation} {model}"`` (GenAI naming) under ``parent`` (a ``current_context()``; default: the current one)."""
    if _trace is None:
        return Span()
    kind = _trace.SpanKind.SERVER if server else _trace.SpanKind.INTERNAL
    tracer = _trace.get_tracer(_SCOPE)
    s = tracer.start_span(f"{operation} {model}", context=parent, kind=kind,
                          attributes=_clean({"gen_ai.operation.name": operation, "gen_ai.request.model": model, "gen_ai.provider.name": "safeguard",
                                             **(attributes or {})}))
    return Span(s)


@contextmanager
def attached(s: Span) -> Iterator[Span]:
    """Make ``s`` the current span inside the block (threads started with the context, ``asyncio.to_thread``, inherit it)."""
    token = _context.attach(_trace.set_span_in_context(s._span)) if s._span is not None else None
    try:
        yield s
    finally:
        if token is not None:
            _context.detach(token)


@contextmanager
def span(operation: str, model: str, attributes: dict[str, Any] | None = None, *, server: bool = False) -> Iterator[Span]:
    """A span around a block, current inside it (children nest under it); an exception marks it as an error."""
    s = start_span(operation, model, attributes=attributes, server=server)
    try:
        with attached(s):
            yield s
    except BaseException as exc:
        s.error(exc)
        raise
    finally:
        s.end()
