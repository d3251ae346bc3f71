"""``SafeguardGuard``: a safeguard policy's detectors screening the requests of *another* chat model.

    input ─► SteeredLLM.classify (the user's turns only, no generation)
        ├─ a ``refuse`` or ``block`` category fired ─► AIMessage(refusal or the block message), never forwarded
        └─ nothing (or only ``redirect`` categories) fired ─► guarded.invoke / stream / batch

The small local model reads the request once at prefill; the guarded model (hosted or local) answers what
passes. Every reply carries the verdict in ``response_metadata["safeguard"]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig, get_config_list

from safeguard import InputError, Policy, SteeredLLM, SteeringReport

from ._convert import REPORT_KEY, report_dict, to_chat_messages
from ._loading import shared_llm
from ._policy import registered_policies, request_policy

__all__ = ["DEFAULT_REFUSAL", "SafeguardGuard"]

DEFAULT_REFUSAL = "I can't help with that request."


def _messages(value: LanguageModelInput) -> list[BaseMessage]:
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, Sequence):
        return convert_to_messages(value)
    raise InputError(f"SafeguardGuard takes a string, a PromptValue or a list of messages, not {type(value).__name__}")


class SafeguardGuard(Runnable[LanguageModelInput, BaseMessage]):
    """Screen requests with a safeguard policy before ``guarded`` (any LangChain chat model) sees them.

    .. code-block:: python

        from langchain_safeguard import SafeguardGuard

        guarded = SafeguardGuard(ChatOpenAI(model="..."), policy="eu")
        guarded.invoke("How do I pick my neighbour's lock?")      # AIMessage("I can't help ...")
        guarded.invoke("How do I bake bread?")                   # the guarded model's answer
        msg.response_metadata["safeguard"]["fired"]               # the verdict, on both kinds of reply

    ``config={"configurable": {"policy": ...}}`` or a call's ``policy=`` picks a policy per request by name (``policies=``
    registers names; shipped names work) or as a ``Policy``, never by file path (a batch screens each distinct
    policy's rows in one pass). A request is refused when a category with ``response: refuse`` fires (``redirect`` categories need the
    steered model itself, so here they are reported, not acted on). ``llm`` shares a loaded ``SteeredLLM``;
    otherwise ``model`` / ``sae`` / ``quantization`` / ``device`` name the one to load (the embedded model by
    default), shared with every ``ChatSafeguard`` that asks for the same.
    """

    def __init__(self, guarded: Runnable[Any, Any], *, policy: Policy | str | Path | None = None,
                 policies: Mapping[str, Policy | str | Path] | None = None, refusal: str = DEFAULT_REFUSAL,
                 llm: SteeredLLM | None = None, model: str | None = None, sae: str | list[str] | None = None,
                 quantization: str | None = None, device: str | None = None, batch_size: int = 8):
        if llm is not None and any(x is not None for x in (model, sae, quantization, device)):
            raise InputError("pass either llm= (a ready SteeredLLM) or model/sae/quantization/device to load one, not both")
        self.guarded = guarded
        self.policy = policy
        self.policies = registered_policies(policies)
        """Named policies a request may pick by name, besides the shipped names and ``Policy`` objects."""
        self.refusal = refusal
        self.batch_size = batch_size
        self._llm = llm
        self._load = (model, sae, quantization, device)

    @property
    def steered_llm(self) -> SteeredLLM:
        if self._llm is None:
            self._llm = shared_llm(*self._load)
        return self._llm

    # ------------------------------------------------------------------------------------ screening
    def screen(self, inputs: Sequence[LanguageModelInput], policies: Sequence[Any] | None = None) -> list[SteeringReport]:
        """The verdict on each input (its user turns): one padded pass per distinct policy. ``policies`` gives
        each input its own (``None``: the guard's ``policy``)."""
        return self._screen_rows([to_chat_messages(_messages(x)) for x in inputs], policies)

    def _screen_rows(self, rows: list[list[dict[str, str]]], policies: Sequence[Any] | None) -> list[SteeringReport]:
        chosen = [self.policy if policies is None or policies[i] is None else policies[i] for i in range(len(rows))]
        out: list[SteeringReport | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(chosen):
            groups.setdefault(id(p), []).append(i)
        for idx in groups.values():
            reports = self.steered_llm.classify([rows[i] for i in idx], policy=chosen[idx[0]], batch_size=self.batch_size)
            for i, rep in zip(idx, reports, strict=True):
                out[i] = rep
        return out  # type: ignore[return-value]

    def _policy_of(self, config: RunnableConfig | None, kwargs: Mapping[str, Any] | None = None) -> Policy | None:
        """A per-request policy from the call's ``policy=`` or ``config["configurable"]["policy"]``, as ChatSafeguard
        reads it: a registered or shipped name, or a ``Policy``; never a file path."""
        value = (kwargs or {}).get("policy")
        if value is None:
            value = ((config or {}).get("configurable") or {}).get("policy")
        return request_policy(value, self.policies)

    @staticmethod
    def blocks(report: SteeringReport) -> bool:
        """Whether the verdict stops the request: some ``refuse`` or ``block`` category fired."""
        return any(d.fired and d.response in ("refuse", "block") for d in report.decisions)

    def _refusal(self, report: SteeringReport) -> AIMessage:
        """A fired ``block`` category answers with its policy's message; a ``refuse`` one with ``refusal``."""
        block = next((d.message for d in report.decisions if d.fired and d.response == "block" and d.message), None)
        return AIMessage(block or self.refusal, response_metadata={REPORT_KEY: report_dict(report), "finish_reason": "safeguard"})

    @staticmethod
    def _tag(reply: Any, report: SteeringReport) -> Any:
        if isinstance(reply, BaseMessage):
            reply.response_metadata = {**reply.response_metadata, REPORT_KEY: report_dict(report)}
        return reply

    # ------------------------------------------------------------------------------------ Runnable
    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> BaseMessage:
        policy = self._policy_of(config, kwargs)
        kwargs.pop("policy", None)
        [report] = self.screen([input], [policy])
        if self.blocks(report):
            return self._refusal(report)
        return self._tag(self.guarded.invoke(input, config, **kwargs), report)

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """The guarded model's chunks, the first tagged with the verdict (``response_metadata["safeguard"]``; once, since
        adding chunks concatenates their metadata strings), or the refusal."""
        policy = self._policy_of(config, kwargs)
        kwargs.pop("policy", None)
        [report] = self.screen([input], [policy])
        if self.blocks(report):
            yield self._refusal(report)
            return
        first = True
        for chunk in self.guarded.stream(input, config, **kwargs):
            yield self._tag(chunk, report) if first else chunk
            first = False

    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Screen every input in one pass; only the inputs that pass go to ``guarded.batch``."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        out: list[Any] = [None] * len(inputs)
        rows: dict[int, list[dict[str, str]]] = {}
        for i, x in enumerate(inputs):
            try:
                rows[i] = to_chat_messages(_messages(x))
            except Exception as exc:
                if not return_exceptions:
                    raise
                out[i] = exc
        policy = kwargs.pop("policy", None)
        chosen: dict[int, Any] = {}
        for i in list(rows):
            try:
                chosen[i] = self._policy_of(configs[i], {"policy": policy})
            except Exception as exc:
                if not return_exceptions:
                    raise
                out[i] = exc
                del rows[i]
        reports = dict(zip(rows, self._screen_rows(list(rows.values()), [chosen[i] for i in rows]), strict=True))
        passed = []
        for i, report in reports.items():
            if self.blocks(report):
                out[i] = self._refusal(report)
            else:
                passed.append(i)
        if passed:
            replies = self.guarded.batch([inputs[i] for i in passed], [configs[i] for i in passed], return_exceptions=return_exceptions, **kwargs)
            for i, reply in zip(passed, replies, strict=True):
                out[i] = reply if isinstance(reply, Exception) else self._tag(reply, reports[i])
        return out
