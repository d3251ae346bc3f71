"""``create_app``: an OpenAI-compatible FastAPI app around one ``SteeredLLM``.

Request to reply::

    POST /v1/chat/completions ─► API key ─► body limit ─► ChatRequest (400 naming the field) ─► policy by name
        ─► admission (429 when the queue is full) ─► the engine's batcher: concurrent requests, streaming or not, share
           decode steps (they join between steps; ``runtime/continuous.py``)
        ─► reply with usage and the steering report under ``safeguard`` ─► metrics, one log record

Policies are named on the server (``policies={"eu": "policies/eu.yaml"}``); a request picks one with
``model="safeguard/eu"`` or ``{"safeguard": {"policy": "eu"}}`` and can never name a file. ``safeguard`` (the bare
model id) is the default policy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import telemetry
from ..errors import InputError, PolicyError, SafeguardError
from ..runtime.batching import BatchingConfig, MicroBatcher, Settings
from ..runtime.continuous import IterationBatcher
from .metrics import Metrics
from .protocol import (
    ApiError,
    ChatRequest,
    ModerationRequest,
    chat_chunk,
    chat_completion,
    error_body,
    finish_reason,
    new_id,
    usage,
    validation_error,
)

__all__ = ["MODEL_PREFIX", "PolicyTable", "ServerConfig", "create_app"]

log = logging.getLogger("safeguard")
MODEL_PREFIX = "safeguard"
_POLL_S = 0.25
"""How often a waiting non-streaming request checks whether its client is still there."""


@dataclass(frozen=True)
class ServerConfig:
    """Limits and switches of one server."""

    api_key: str | None = None
    """Clients must send ``Authorization: Bearer KEY`` (``/health`` is open). ``None``: no key."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies get 413."""
    max_tokens: int = 1024
    """A request asking for more new tokens gets 400."""
    default_max_tokens: int = 256
    request_timeout_s: float = 120.0
    """From arrival to the last token; past it a request gets 504 (a stream gets an error event) and its row stops."""
    max_queue: int = 64
    """Requests admitted and not finished (waiting or generating); one more gets 429."""
    batching: bool = True
    """Off: non-streaming requests run one at a time (the serialized baseline)."""
    batch_window_s: float = 0.005
    max_batch: int = 8

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "default_max_tokens", "max_queue", "max_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.batch_window_s < 0:
            raise InputError("ServerConfig.request_timeout_s must be > 0 and batch_window_s >= 0")
        if self.default_max_tokens > self.max_tokens:
            raise InputError(f"ServerConfig.default_max_tokens={self.default_max_tokens} exceeds max_tokens={self.max_tokens}")


class PolicyTable:
    """Server-side policy names. Requests choose among these names only."""

    def __init__(self, policies: Mapping[str, Any], default: str):
        if default not in policies:
            raise PolicyError(f"the default policy {default!r} is not among the named policies {sorted(policies)}")
        self.policies = dict(policies)
        self.default = default

    @classmethod
    def build(cls, llm: Any, specs: Mapping[str, Any] | None, default: str | None = None) -> PolicyTable:
        """Load and compile every named policy (a ``Policy``, a file, or whatever ``Policy.load`` takes) once, so a
        broken file fails at start-up. Without a ``default`` entry, the model's active policy is ``default``."""
        table: dict[str, Any] = {}
        for name, spec in (specs or {}).items():
            if not name or "/" in name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise PolicyError(f"policy name {name!r}: use letters, digits, '-', '_' or '.'")
            table[name] = llm.compile_policy(spec).policy
        if "default" not in table and (default is None or default == "default"):
            table["default"] = llm.policy  # may be None: no steering
        return cls(table, default or "default")

    def model_ids(self) -> list[str]:
        return [MODEL_PREFIX] + [f"{MODEL_PREFIX}/{n}" for n in self.policies]

    def resolve(self, model: str | None, option: str | None) -> tuple[str, Any]:
        """The policy's name and object for a request's ``model`` and ``safeguard.policy``; 400 listing the names."""
        if option is not None:
            name, param = option, "safeguard.policy"
        elif model is None or model == MODEL_PREFIX:
            name, param = self.default, "model"
        elif model.startswith(MODEL_PREFIX + "/"):
            name, param = model[len(MODEL_PREFIX) + 1:], "model"
        else:
            raise ApiError(400, f"unknown model {model[:100]!r}; known models: {self.model_ids()}", param="model", code="model_not_found")
        if name not in self.policies:
            raise ApiError(400, f"unknown policy {name[:100]!r}; known policies: {sorted(self.policies)}", param=param, code="policy_not_found")
        return name, self.policies[name]


class _Server:
    def __init__(self, llm: Any, policies: Mapping[str, Any] | None, default: str | None, config: ServerConfig):
        self._llm_or_loader = llm
        self._specs = policies
        self._default = default
        self.config = config
        self.metrics = Metrics()
        self.llm: Any = None
        self.table: PolicyTable | None = None
        self.batcher: IterationBatcher | MicroBatcher | None = None
        self._owns_batching = False
        self.inflight = 0
        self._started = threading.Lock()

    def start(self) -> None:
        with self._started:
            if self.batcher is not None:
                return
            llm = self._llm_or_loader
            self.llm = llm() if callable(llm) and not hasattr(llm, "batch") else llm
            self.table = PolicyTable.build(self.llm, self._specs, self._default)
            c = self.config
            # the engine's batcher: the server's requests and in-process calls on the same model share batches
            if getattr(self.llm, "batcher", None) is None:
                self.llm.enable_batching(BatchingConfig(window_ms=c.batch_window_s * 1000 if c.batching else 0.0,
                                                        max_batch=c.max_batch if c.batching else 1))
                self._owns_batching = True
            else:
                log.info("the model already batches (%s); its settings win over the server's", self.llm.batching)
            self.batcher = self.llm.batcher
            self.batcher.on_batch = self.metrics.batch_rows.observe
            log.info("serving %s with policies %s (default %s)", getattr(self.llm, "model_name", "?"), sorted(self.table.policies),
                     self.table.default)

    def stop(self) -> None:
        if self.batcher is not None:
            if self._owns_batching:
                self.llm.disable_batching()  # finishes the queued requests
                self._owns_batching = False
            else:
                self.batcher.on_batch = None

    # ---------------------------------------------------------------------------------------- helpers
    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode("utf-8")):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes; at most {limit} are accepted", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    def admit(self) -> None:
        if self.inflight >= self.config.max_queue:
            raise ApiError(429, f"the server is busy: {self.inflight} requests are queued or running (limit {self.config.max_queue}); retry later",
                           code="queue_full")
        self.inflight += 1
        self.metrics.queue_depth.set(self.inflight)

    def release(self) -> None:
        self.inflight -= 1
        self.metrics.queue_depth.set(self.inflight)

    def max_tokens(self, req: ChatRequest) -> int:
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if asked is None:
            return self.config.default_max_tokens
        if asked > self.config.max_tokens:
            raise ApiError(400, f"{param}={asked} exceeds this server's limit of {self.config.max_tokens}", param=param, code="max_tokens_exceeded")
        return asked

    def record(self, endpoint: str, policy: str, status: int, t0: float, result: Any = None) -> None:
        self.metrics.requests.labels(endpoint=endpoint, policy=policy, status=str(status)).inc()
        self.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - t0)
        if result is not None:
            self.record_result(policy, result)

    def record_result(self, policy: str, result: Any) -> None:
        self.metrics.tokens.labels(policy=policy).inc(result.completion_tokens)
        for cat in result.report.fired:
            self.metrics.fired.labels(policy=policy, category=cat).inc()


def _end_span(span: telemetry.Span, status: int, result: Any = None) -> None:
    span.set_attrs({"http.response.status_code": status})
    if result is not None:
        span.record_result(result)
    if status >= 500:
        span.set_attrs({"error.type": str(status)})
    span.end()


def _report(name: str, report: Any) -> dict[str, Any]:
    return {"policy": name, **report.to_dict()}


def _report_headers(name: str, report: Any) -> dict[str, str]:
    """The report as response headers too: LangChain's ``ChatOpenAI(include_response_headers=True)`` shows them."""
    return {"x-safeguard-policy": name, "x-safeguard-fired": ",".join(report.fired),
            "x-safeguard-report": json.dumps(_report(name, report), separators=(",", ":"))}


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent: up to the first stop string, less any tail that could start one."""
    if not stops:
        return len(text)
    cut = min((text.find(st) for st in stops if st in text), default=-1)
    if cut >= 0:
        return cut
    hold = max((k for st in stops for k in range(min(len(st) - 1, len(text)), 0, -1) if text.endswith(st[:k])), default=0)
    return len(text) - hold


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _StreamResponse(StreamingResponse):
    """A streaming response that runs ``cleanup`` however it ends, even when its body never starts."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], None], **kw: Any):
        super().__init__(body, media_type="text/event-stream", **kw)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def create_app(llm: Any, policies: Mapping[str, Any] | None = None, *, default_policy: str | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    """The app. ``llm`` is a ``SteeredLLM`` or a no-argument callable that loads one at start-up (one per Ray replica).
    ``policies`` maps names to policies (``Policy`` objects or files); ``default_policy`` names the one the bare model
    id ``safeguard`` uses (default: ``default``, the model's active policy unless ``policies`` names one)."""
    srv = _Server(llm, policies, default_policy, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(srv.start)
        try:
            yield
        finally:
            await asyncio.to_thread(srv.stop)  # uvicorn has already waited for the requests in flight

    app = FastAPI(title="safeguard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.safeguard = srv

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"), status_code=500)

    def _ready() -> _Server:
        if srv.batcher is None:  # an app driven without its lifespan
            srv.start()
        return srv

    def _safeguard_error(exc: SafeguardError) -> ApiError:
        param = "model" if isinstance(exc, PolicyError) else "messages" if isinstance(exc, InputError) else None
        return ApiError(400, str(exc), param=param, code=type(exc).__name__)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = _ready()
        return {"status": "ok", "model": getattr(s.llm, "model_name", None), "policies": sorted(s.table.policies),
                "default_policy": s.table.default, "queue_depth": s.inflight, "batching": s.config.batching, "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        srv.check_key(request)
        body, ctype = srv.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        s = _ready()
        s.check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "safeguard"} for m in s.table.model_ids()]}

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> JSONResponse:
        s = _ready()
        s.check_key(request)
        t0 = time.monotonic()
        try:
            req = ModerationRequest.model_validate(await s.read_json(request))
        except ValidationError as exc:
            raise validation_error(exc) from None
        name, policy = s.table.resolve(req.model, req.safeguard.policy if req.safeguard else None)
        s.admit()
        status, reports = 500, None
        span = telemetry.start_span("classify", f"{MODEL_PREFIX}/{name}", server=True)
        try:
            with telemetry.attached(span):  # the model's classify span nests under the request's
                reports = await asyncio.wait_for(asyncio.to_thread(s.llm.classify, req.texts(), policy=policy), s.config.request_timeout_s)
            status = 200
        except TimeoutError:
            status = 504
            raise ApiError(504, f"moderation took longer than {s.config.request_timeout_s} s", code="timeout") from None
        except SafeguardError as exc:
            status = 400
            raise _safeguard_error(exc) from None
        finally:
            s.release()
            s.record("moderations", name, status, t0)
            if reports:
                span.set_attrs({"safeguard.fired": sorted({c for r in reports for c in r.fired})})
            _end_span(span, status)
        for r in reports:
            for cat in r.fired:
                s.metrics.fired.labels(policy=name, category=cat).inc()
        results = [{"flagged": bool(r.fired), "categories": {d.category: bool(d.fired) for d in r.decisions},
                    "category_scores": {d.category: float(d.score) for d in r.decisions}} for r in reports]
        return JSONResponse({"id": new_id("modr"), "model": f"{MODEL_PREFIX}/{name}", "results": results,
                             "safeguard": {"policy": name, "reports": [r.to_dict() for r in reports]}})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        s = _ready()
        s.check_key(request)
        t0 = time.monotonic()
        try:
            req = ChatRequest.model_validate(await s.read_json(request))
        except ValidationError as exc:
            raise validation_error(exc) from None
        name, policy = s.table.resolve(req.model, req.safeguard.policy if req.safeguard else None)
        settings = Settings(s.max_tokens(req), req.temperature, tuple(req.stop or ()), req.seed)
        messages = req.messages_as_dicts()
        model_id = f"{MODEL_PREFIX}/{name}"
        deadline = t0 + s.config.request_timeout_s
        span = telemetry.start_span("chat", model_id, server=True, attributes={
            "gen_ai.request.max_tokens": settings.max_new_tokens, "gen_ai.request.temperature": settings.temperature or 0.0})
        try:
            s.admit()
        except ApiError as exc:
            _end_span(span, exc.status)
            raise
        if req.stream:
            return await _stream(s, request, req, name, policy, settings, messages, model_id, t0, deadline, span)
        status = 500
        result = None
        try:
            job = s.batcher.submit(messages, policy, settings, deadline=deadline, parent=telemetry.context_of(span))
            waiting = asyncio.wrap_future(job.future)
            while not waiting.done():  # until the row is done, the deadline passes, or the client leaves
                left = deadline - time.monotonic()
                if left <= 0:
                    job.abandon()
                    waiting.cancel()
                    status = 504
                    raise ApiError(504, f"the request took longer than the server's timeout of {s.config.request_timeout_s} s",
                                   code="timeout")
                await asyncio.wait({waiting}, timeout=min(_POLL_S, left))
                if not waiting.done() and await request.is_disconnected():
                    job.abandon()  # its row stops at the next decode step
                    waiting.cancel()
                    status = 499
                    return Response(status_code=499)
            try:
                result = waiting.result()
            except SafeguardError as exc:
                status = 400
                raise _safeguard_error(exc) from None
            if time.monotonic() >= deadline:  # its row was stopped at the deadline: the text is cut short
                status = 504
                raise ApiError(504, f"the request took longer than the server's timeout of {s.config.request_timeout_s} s", code="timeout")
            status = 200
        finally:
            s.release()
            s.record("chat", name, status, t0, result=result)
            _end_span(span, status, result)
        return JSONResponse(chat_completion(model_id, result, _report(name, result.report)), headers=_report_headers(name, result.report))

    return app


async def _stream(s: _Server, request: Request, req: ChatRequest, name: str, policy: Any, settings: Settings,
                  messages: list[dict[str, str]], model_id: str, t0: float, deadline: float, span: telemetry.Span) -> Response:
    """Queue a streaming row with the batcher (bad input is still a 400 here) and answer with SSE chunks fed by a pump
    thread. Concurrent streams share one padded generate call, as non-streaming requests do."""
    state: dict[str, Any] = {"status": 500, "result": None, "done": False}
    job = s.batcher.submit(messages, policy, settings, deadline=deadline, stream=True, parent=telemetry.context_of(span))

    def cleanup() -> None:
        if state["done"]:
            return
        state["done"] = True
        job.abandon()  # its row stops at the next decode step
        s.release()
        s.record("chat_stream", name, state["status"], t0)  # tokens and fired categories: counted by the pump
        _end_span(span, state["status"], state["result"])

    waiting = asyncio.wrap_future(job.future)
    try:
        while not waiting.done():  # until its batch starts, the deadline passes, or the client leaves
            left = deadline - time.monotonic()
            if left <= 0:
                state["status"] = 504
                raise ApiError(504, f"the request took longer than the server's timeout of {s.config.request_timeout_s} s", code="timeout")
            await asyncio.wait({waiting}, timeout=min(_POLL_S, left))
            if not waiting.done() and await request.is_disconnected():
                state["status"] = 499
                cleanup()
                return Response(status_code=499)
        stream = waiting.result()
    except SafeguardError as exc:
        state["status"] = 400
        cleanup()
        param = "model" if isinstance(exc, PolicyError) else "messages"
        raise ApiError(400, str(exc), param=param, code=type(exc).__name__) from None
    except BaseException:
        cleanup()
        raise

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown); the stream is closed below anyway
            pass

    def pump() -> None:
        try:
            for piece in stream:
                if job.abandoned:
                    break
                put(("piece", piece))
            stream.close()  # stops its row when we broke out early; a no-op after the last piece
            result = stream.result
            if result is not None:
                s.record_result(name, result)
            if job.abandoned:
                s.metrics.streams_stopped.inc()
            put(("done", result))
        except BaseException as exc:
            put(("error", exc))

    threading.Thread(target=pump, name="safeguard-sse-pump", daemon=True).start()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        cid, created = new_id("chatcmpl"), int(time.time())
        first, text, sent = True, "", ""
        yield _sse(chat_chunk(cid, created, model_id, delta={"role": "assistant", "content": ""}))
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    state["status"] = 504
                    job.abandon()
                    yield _sse(error_body(504, f"the request took longer than the server's timeout of {s.config.request_timeout_s} s",
                                          code="timeout"))
                    break
                if kind == "piece":
                    if first:
                        s.metrics.ttft.observe(time.monotonic() - t0)
                        first = False
                    text += value
                    safe = _safe_length(text, settings.stop)  # never send the start of what may become a stop string
                    if safe > len(sent):
                        yield _sse(chat_chunk(cid, created, model_id, delta={"content": text[len(sent):safe]}))
                        sent = text[:safe]
                    continue
                if kind == "error":
                    state["status"] = 400 if isinstance(value, SafeguardError) else 500
                    msg = str(value) if isinstance(value, SafeguardError) else f"internal error ({type(value).__name__})"
                    yield _sse(error_body(state["status"], msg))
                    break
                result = value
                state["result"] = result
                if job.abandoned:  # stopped at the deadline between two pieces
                    state["status"] = 504
                    yield _sse(error_body(504, f"the request took longer than the server's timeout of {s.config.request_timeout_s} s",
                                          code="timeout"))
                    break
                if result.text.startswith(sent) and len(result.text) > len(sent):  # what was held back and is not a stop string
                    yield _sse(chat_chunk(cid, created, model_id, delta={"content": result.text[len(sent):]}))
                report = _report(name, result.report)
                state["status"] = 200
                yield _sse(chat_chunk(cid, created, model_id, finish=finish_reason(result.finish_reason), report=report))
                if include_usage:
                    yield _sse(chat_chunk(cid, created, model_id, choices=False,
                                          usage_=usage(result.prompt_tokens, result.completion_tokens), report=report))
                break
            yield "data: [DONE]\n\n"
        finally:
            if state["status"] == 500 and not state["result"]:
                state["status"] = 499  # the client went away mid-stream
            cleanup()

    return _StreamResponse(events(), cleanup, headers={"x-safeguard-policy": name, "cache-control": "no-cache"})


def config_from_env(**overrides: Any) -> ServerConfig:
    """A ``ServerConfig`` whose ``api_key`` defaults to ``$SAFEGUARD_API_KEY``."""
    overrides.setdefault("api_key", os.environ.get("SAFEGUARD_API_KEY") or None)
    return ServerConfig(**overrides)
