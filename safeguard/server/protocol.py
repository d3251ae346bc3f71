"""The OpenAI wire format the server speaks: request models (validated at the edge), response bodies, errors.

Every bad value is a 400 in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` whose ``param``
names the field; nothing falls back silently. Fields OpenAI clients send that change nothing here (``user``,
``metadata``, ``n=1``, ``top_p=1``, zero penalties) are accepted; anything else unknown is refused.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "ApiError",
    "ChatRequest",
    "ModerationRequest",
    "chat_chunk",
    "chat_completion",
    "error_body",
    "validation_error",
]

MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
MAX_MODERATION_INPUTS = 32
SEED_MAX = 2**63 - 1

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error",
          504: "timeout"}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as a 400 naming the first bad field (every problem is in the message)."""
    errs = exc.errors(include_url=False)
    where = [".".join(str(p) for p in e["loc"]) for e in errs]
    msg = "; ".join(f"{w or 'body'}: {e['msg']}" for w, e in zip(where, errs, strict=True))
    return ApiError(400, msg, param=where[0] if where else None, code="invalid_value")


def _no_surrogates(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} contains a lone surrogate at position {exc.start}; send valid UTF-8") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _utf8(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        for text in [v] if isinstance(v, str) else [p.text for p in v]:
            _no_surrogates(text, "content")
        return v

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class SafeguardOptions(_Strict):
    """The ``safeguard`` object of a request (``extra_body={"safeguard": {...}}`` in the openai client)."""

    policy: str | None = None
    """A policy name registered on the server; never a path."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    include_usage: bool = False


_Temperature = Annotated[float | None, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)]
_Unit = Annotated[float | None, Field(strict=True, allow_inf_nan=False)]


class ChatRequest(_Strict):
    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    temperature: _Temperature = None
    top_p: _Unit = None
    stop: str | list[str] | None = None
    seed: Annotated[int | None, Field(strict=True, ge=0, le=SEED_MAX)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, Field(strict=True)] = None
    presence_penalty: _Unit = None
    frequency_penalty: _Unit = None
    logprobs: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safeguard: SafeguardOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)  # a plain string is one stop string, not its characters
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        for i, s in enumerate(stops):
            if not s:
                raise ValueError(f"stop[{i}] is empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
            _no_surrogates(s, f"stop[{i}]")
        return stops

    @field_validator("n", "top_p", "presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        neutral = {"n": 1, "top_p": 1.0}.get(info.field_name)
        if v is not None and v != neutral and (neutral is not None or v):
            raise ValueError(f"{info.field_name}={v!r} is not supported by this server")
        return v

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


class ModerationRequest(_Strict):
    input: str | list[str]
    model: str | None = Field(default=None, max_length=200)
    safeguard: SafeguardOptions | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("input is empty")
        if len(texts) > MAX_MODERATION_INPUTS:
            raise ValueError(f"at most {MAX_MODERATION_INPUTS} inputs per request, got {len(texts)}")
        for i, t in enumerate(texts):
            _no_surrogates(t, f"input[{i}]")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(model: str, result: Any, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": finish_reason(result.finish_reason), "logprobs": None}],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
        "safeguard": report,
    }


def chat_chunk(cid: str, created: int, model: str, *, delta: dict[str, Any] | None = None, finish: str | None = None,
               usage_: dict[str, int] | None = None, report: dict[str, Any] | None = None, choices: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}] if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    if report is not None:
        out["safeguard"] = report
    return out
