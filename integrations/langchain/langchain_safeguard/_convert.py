"""LangChain messages in, safeguard results out.

    [SystemMessage, HumanMessage, AIMessage, ...]
        ─► [{"role": "system" | "user" | "assistant", "content": str}]   (text blocks joined, same roles merged)
    GenerationResult(text, report, tokens, finish_reason)
        ─► AIMessage(content, usage_metadata, response_metadata={"model_name", "finish_reason", "safeguard"})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata

from safeguard import GenerationResult, InputError, SteeringReport

__all__ = ["REPORT_EVENT", "REPORT_KEY", "report_dict", "response_metadata", "to_chat_messages", "usage"]

REPORT_KEY = "safeguard"
"""Where the steering report lives in ``response_metadata``."""
REPORT_EVENT = "safeguard_report"
"""The name of the custom callback event that carries the report."""

_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            raise InputError(
                f"{where}.content[{j}] is a {kind!r} block; ChatSafeguard reads text only "
                "(a string, or a list of strings and {'type': 'text', 'text': ...} blocks)"
            )
    return "\n".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """Convert a LangChain history to ``SteeredLLM.chat`` messages.

    System messages may only open the conversation; consecutive messages of one role are merged (with a
    blank line), so double system/human/AI turns work with chat templates that expect alternation. Tool
    messages and AI tool calls are refused: ChatSafeguard does not do tool calling.
    """
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}] ({type(m).__name__})"
        if isinstance(m, ChatMessage):
            role = _ROLES.get(m.role)
        elif isinstance(m, (SystemMessage, HumanMessage, AIMessage)):
            role = _ROLES[m.type]
        else:
            role = None
        if role is None:
            kind = m.role if isinstance(m, ChatMessage) else m.type
            raise InputError(f"{where}: role {kind!r} is not supported; ChatSafeguard takes system, human and AI messages (no tool calling)")
        if isinstance(m, AIMessage) and m.tool_calls:
            raise InputError(f"{where} carries tool calls; ChatSafeguard does not do tool calling")
        text = _text(m.content, where)
        if role == "system" and any(o["role"] != "system" for o in out):
            raise InputError(f"{where}: a system message may only open the conversation")
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    if not out:
        raise InputError("the conversation is empty")
    if out[-1]["role"] != "user":
        raise InputError(f"the last message must be a human message (it is a {out[-1]['role']} message); the model replies to the user")
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def report_dict(report: SteeringReport) -> dict[str, Any]:
    """``report.to_dict()`` with lists instead of tuples, ready for JSON and for tracing tools."""
    return _jsonable(report.to_dict())


def usage(result: GenerationResult) -> UsageMetadata:
    return UsageMetadata(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens,
                         total_tokens=result.prompt_tokens + result.completion_tokens)


def response_metadata(result: GenerationResult, model_name: str) -> dict[str, Any]:
    return {"model_name": model_name, "finish_reason": result.finish_reason, REPORT_KEY: report_dict(result.report)}
