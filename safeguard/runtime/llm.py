"""``SteeredLLM``: a causal LM, its SAEs and an active policy, with generate / chat / stream / batch / async.

Prompt to text::

    prompt or messages ─► chat template + a mask of the user's tokens ─► left-padded batch
        ─► model.generate inside steering(model, run)  (hooks detect at prefill, steer fired rows)
        ─► text cut at end-of-turn or a stop string ─► GenerationResult(text, report)

Batching (opt-in, ``batching=BatchingConfig(...)`` or ``enable_batching()``): ``generate`` / ``chat`` / ``stream``
and their async forms queue a row with the model's batcher instead of taking the model lock themselves. The default,
``IterationBatcher`` (``continuous.py``), runs its own decode loop: a row joins the running batch between decode
steps and leaves it when it ends, each under its own policy, max tokens, stop strings, sampler and cancellation.
``mode="window"``: the ``MicroBatcher`` (``batching.py``), where concurrent calls with the same sampler share one
padded ``stream_batch`` call. Off, each call is its own generate.

Two locks. Generation holds ``_model_lock``: hooks are registered on the one shared model for the length of a
call, so two threads never see each other's steering (per-row policies in one batch need no lock between rows).
The active policy and the compile cache have their own short ``_state_lock``, so ``use_policy`` never waits
behind a running generation; a call resolves its policy before it takes the model, and keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import numbers
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from .. import telemetry
from ..errors import InputError, PolicyError, SAEError
from ._files import contained_path
from .batching import BatchingConfig, MicroBatcher, Settings
from .compile import resolve
from .continuous import IterationBatcher, supports_iteration
from .models import LoadedModel, load_model
from .names import same_model
from .openers import ForceOpener, uses_openers
from .pack import Pack, find_pack
from .policy import Policy
from .policy import is_shipped_name as _is_shipped_name
from .report import GenerationResult, SteeringReport
from .saes import SAESet, load_saes
from .steering import CompiledPolicy, RunState, decoder_layers, forward_until, generate_positions, steering
from .streams import TextStream, _Batch, _Rows

__all__ = ["MAX_STOP_CHARS", "MAX_STOP_STRINGS", "PRODUCTION_MODEL", "PRODUCTION_SAE", "BatchingConfig", "SteeredLLM", "TextStream"]

log = logging.getLogger("safeguard")

PRODUCTION_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
PRODUCTION_SAE = "llama-3-8b-it-res-jh:blocks.25.hook_resid_post"
_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
"""Most stop strings one call may pass."""
MAX_STOP_CHARS = 256
"""Longest stop string, in characters."""
_UNSET: Any = object()
_BATCHABLE_KWARGS = frozenset({"max_time"})
"""Generation keyword arguments a batched call may carry (rows with equal values share a generate call); a call with
any other runs alone."""

PromptLike = str | Sequence[Mapping[str, Any]]
PolicyLike = Policy | str | Path
"""A ``Policy``, a shipped policy's name (``"eu"``) or a policy file's path."""


def _check_text(where: str, text: str) -> None:
    """Text the tokenizer can take: encodable as UTF-8 (a lone surrogate such as '\\ud800' is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where} holds a lone surrogate {text[exc.start]!r} at character {exc.start}; text must be valid Unicode") from None


def _stop_strings(stop: Any) -> list[str]:
    """``stop`` as a list of stop strings: a plain string is one stop string; each is non-empty, at most
    ``MAX_STOP_CHARS`` characters, and there are at most ``MAX_STOP_STRINGS``."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, Sequence) or isinstance(stop, (bytes, bytearray)):
        raise InputError(f"stop must be a string or a list of strings, not {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InputError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise InputError(f"stop[{i}] must be a string, not {type(s).__name__}")
        if not s:
            raise InputError(f"stop[{i}] is empty; an empty stop string would end every reply at once")
        if len(s) > MAX_STOP_CHARS:
            raise InputError(f"stop[{i}] has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
        _check_text(f"stop[{i}]", s)
    return list(stop)


def _temperature(temperature: Any) -> float | None:
    """A sampling temperature (> 0), or ``None`` for greedy decoding (``None`` or 0)."""
    if temperature is None:
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise InputError(f"temperature must be a number >= 0 (0 or None: greedy), not {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 or None: greedy), got {t}")
    return t or None


def _seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed must be an integer in [0, 2**63 - 1], not {type(seed).__name__}")
    if not 0 <= seed <= 2**63 - 1:
        raise InputError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return int(seed)


def _max_new_tokens(value: Any, n: int | None = None) -> list[int]:
    """``max_new_tokens``: a positive integer, or (with ``n`` rows) one per row."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value] * (n or 1)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {v!r}")
    if not values:
        raise InputError("max_new_tokens is an empty list")
    return [int(v) for v in values]


def _either(event: threading.Event | None, when: Callable[[], bool] | None) -> Callable[[], bool] | None:
    if event is None:
        return when
    if when is None:
        return event.is_set
    return lambda: event.is_set() or when()


_CANCEL: ContextVar[threading.Event | None] = ContextVar("safeguard_cancel", default=None)
"""Set in the worker thread of an async call: when the awaiting task is cancelled, the call's rows stop."""


def _check_policy_like(policy: Any) -> None:
    if not isinstance(policy, (Policy, str, os.PathLike)):
        raise PolicyError(f"policy must be a Policy, a shipped policy name or a file path, not {type(policy).__name__}")


class SteeredLLM:
    """A causal LM whose refusals are steered, per request, by SAE features chosen in a policy.

    Load the embedded default (SmolLM2-135M-Instruct, its bundled SAEs, detector pack and the ``default`` policy, on CPU)::

        llm = SteeredLLM.from_pretrained()
        r = llm.generate("How do I pick a lock?")
        r.text, r.report.fired

    Production: ``SteeredLLM.from_pretrained("meta-llama/Meta-Llama-3-8B-Instruct",
    sae="llama-3-8b-it-res-jh", policy="eu", quantization="4bit")``: the same policy files, with the Llama-3 pack.
    """

    def __init__(self, loaded: LoadedModel, saes: SAESet, policy: PolicyLike | None = None, *, pack: Pack | str | Path | None = None,
                 log_prompts: bool = False, batching: BatchingConfig | bool | None = None):
        self._loaded = loaded
        self.saes = saes
        releases = sorted({s.release for s in saes.values()})
        self.pack: Pack | None = Pack.load(pack) if pack is not None else find_pack(loaded.name, releases[0] if len(releases) == 1 else None)
        """The detector pack policies are compiled against (the shipped one for this model and SAE, or ``pack=``)."""
        if self.pack is not None and not self.pack.fits(loaded.name, None):
            raise PolicyError(f"pack {self.pack.id!r} is for model {self.pack.model!r}, not the loaded {loaded.name!r}")
        self.log_prompts = log_prompts
        cfg = loaded.model.config
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = len(decoder_layers(loaded.model))
        for s in saes.values():
            s.check_fits(loaded.name, self.hidden_size, self.num_layers)
        self.context_window = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self._model_lock = threading.RLock()
        """Held for the length of a forward pass or a generate call (hooks on the shared model)."""
        self._state_lock = threading.Lock()
        """Held for a few dict operations: the active policy and the compile cache."""
        self._compiled: OrderedDict[tuple[str, str | None, bool], CompiledPolicy] = OrderedDict()
        self._active: CompiledPolicy | None = None
        self._batcher: MicroBatcher | IterationBatcher | None = None
        self._batching: BatchingConfig | None = None
        self._batching_lock = threading.Lock()
        if policy is not None:
            self.use_policy(policy)
        if batching:
            self.enable_batching(batching if isinstance(batching, BatchingConfig) else None)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        sae: Any = None,
        policy: PolicyLike | None = _UNSET,
        pack: Pack | str | Path | None = None,
        quantization: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        log_prompts: bool = False,
        batching: BatchingConfig | bool | None = None,
    ) -> SteeredLLM:
        """Load a model, its SAEs, its detector pack and a policy.

        ``model=None`` is the embedded default with its bundled SAEs and pack, and the shipped ``default`` policy.
        ``pack=None`` takes the shipped pack for the model and SAE (SmolLM2-135M-Instruct; Llama-3-8B-Instruct with
        ``llama-3-8b-it-res-jh``, unmeasured), else give a pack file.
        A hub id or folder needs ``sae=`` (a folder, ``"release"`` or ``"release:sae_id"``, or a list), except
        for Llama-3-8B-Instruct, whose default is ``llama-3-8b-it-res-jh``. ``policy=None`` loads no policy.
        ``batching=BatchingConfig(...)`` (or ``True`` for the defaults) lets concurrent calls share forward passes.
        """
        if model is None and sae is None:
            sae_spec = None
        elif sae is not None:
            sae_spec = sae
        elif same_model(str(model), PRODUCTION_MODEL):
            sae_spec = PRODUCTION_SAE
        else:
            raise SAEError(f"no default SAE is known for model {str(model)!r}; pass sae=FOLDER or sae='release:sae_id'")
        if policy is _UNSET:
            policy = "default" if model is None else None
        if policy is not None:
            policy = Policy.load(policy)  # a broken policy fails before the model is loaded
        if pack is not None:
            pack = Pack.load(pack)
        loaded = load_model(model, quantization=quantization, device=device, dtype=dtype)
        saes = load_saes(sae_spec, device=loaded.model.device)
        return cls(loaded, saes, policy, pack=pack, log_prompts=log_prompts, batching=batching)

    @property
    def model(self) -> Any:
        return self._loaded.model

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def sae(self) -> Any:
        """The SAE (an ``sae_lens.SAE``) when exactly one is loaded; with several, see ``saes``."""
        if len(self.saes) != 1:
            raise AttributeError(f"{len(self.saes)} SAEs are loaded (layers {sorted(self.saes)}); use llm.saes[layer].sae")
        return next(iter(self.saes.values())).sae

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        p = self.policy
        return f"SteeredLLM(model={self.model_name!r}, saes={self.saes!r}, policy={p.name if p else None!r})"

    # ----------------------------------------------------------------------------------------- batching
    def enable_batching(self, config: BatchingConfig | None = None, *, window_ms: float | None = None,
                        max_batch: int | None = None, mode: str | None = None) -> BatchingConfig:
        """Let concurrent ``generate`` / ``chat`` / ``stream`` calls (threads or asyncio) share forward passes.

        ``mode="iteration"`` (default): up to ``max_batch`` rows decode together; a call joins the running batch at the
        next decode step (prefilled first, its detection as in a single call) and a row that ends frees its slot; each
        row has its own settings, sampler and seed included. When the model is idle, a call waits up to ``window_ms``
        for companions to share its prefill. ``mode="window"``: a call waits up to ``window_ms`` after the first
        waiting call for companions with the same sampler, then up to ``max_batch`` of them run as one
        ``stream_batch``. Each call gets its own result or stream. Enabling it again replaces the batcher (after its
        pending calls end)."""
        if config is None:
            config = BatchingConfig(**{k: v for k, v in (("window_ms", window_ms), ("max_batch", max_batch), ("mode", mode)) if v is not None})
        elif window_ms is not None or max_batch is not None or mode is not None:
            raise InputError("pass either a BatchingConfig or window_ms= / max_batch= / mode=, not both")
        if not isinstance(config, BatchingConfig):
            raise InputError(f"batching takes a BatchingConfig, not {type(config).__name__}")
        window_s, max_batch = config.window_ms / 1000, int(config.max_batch)
        if config.mode == "iteration" and not supports_iteration(self.model):
            log.warning("%s has a KV cache that cannot be joined row by row (sliding window or linear attention); "
                        "batching falls back to mode='window'", self.model_name)
            config = dataclasses.replace(config, mode="window")
        with self._batching_lock:
            new: MicroBatcher | IterationBatcher = (IterationBatcher(self, window_s=window_s, max_batch=max_batch) if config.mode == "iteration"
                                                    else MicroBatcher(self, window_s=window_s, max_batch=max_batch))
            old, self._batcher = self._batcher, new
            self._batching = config
        if old is not None:
            old.close()
        return config

    def disable_batching(self) -> None:
        """Back to one generate call per request; calls already queued still finish."""
        with self._batching_lock:
            old, self._batcher = self._batcher, None
        if old is not None:
            old.close()

    @property
    def batching(self) -> BatchingConfig | None:
        """The engine batching in force, or ``None`` (off)."""
        return self._batching if self._batcher is not None else None

    @property
    def batcher(self) -> MicroBatcher | IterationBatcher | None:
        """The engine's batcher while batching is on (``safeguard serve`` submits its requests to it)."""
        return self._batcher

    def _batched(self, prompt: Any, compiled: CompiledPolicy | None, shadows: list[CompiledPolicy], *, max_new_tokens: Any,
                 temperature: Any, stop: Any, template: bool, seed: Any, extra: dict[str, Any], stream: bool) -> Any:
        """Queue one row with the engine's batcher and wait for its result (``stream``: its ``TextStream``), or
        ``_UNSET`` when this call cannot be batched (batching off, unusual generation arguments, or a call from the
        batcher's own thread). Bad arguments fail here, in the caller's thread."""
        b = self._batcher
        if b is None or b.closed or b.in_worker() or not set(extra) <= _BATCHABLE_KWARGS:
            return _UNSET
        max_new = _max_new_tokens(max_new_tokens)
        self._gen_kwargs(max_new, temperature, stop, extra)
        seed = _seed(seed)
        stops = tuple(_stop_strings(stop))
        self._check_fits(len(self._encode_one(prompt, template)[0]), max_new[0])  # a row too long fails alone, here
        settings = Settings(max_new[0], _temperature(temperature), stops, seed, template, tuple(sorted(extra.items())))
        try:
            job = b.submit(prompt, compiled if compiled is not None else False, settings, stream=stream,
                           parent=telemetry.current_context(), shadows=shadows, cancel=_CANCEL.get())
        except RuntimeError:  # closed meanwhile (disable_batching)
            return _UNSET
        return job.result()

    # ----------------------------------------------------------------------------------------- policies
    @property
    def policy(self) -> Policy | None:
        """The active policy."""
        active = self._active  # one read: use_policy may swap it meanwhile
        return active.policy if active else None

    def compile_policy(self, policy: PolicyLike, *, monitor: bool = False) -> CompiledPolicy:
        """Validate, resolve against the pack and compile a policy for this model (cached by content hash).
        ``monitor=True`` compiles it to decide and report only."""
        if isinstance(policy, CompiledPolicy):
            policy = policy.policy
        _check_policy_like(policy)
        p = Policy.load(policy)
        key = (p.content_hash, self.pack.content_hash if self.pack else None, monitor)
        with self._state_lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:  # 4-bit weights: steer in the compute dtype
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        compiled = CompiledPolicy(resolve(p, self.pack), self.saes, model_name=self.model_name, num_layers=self.num_layers, device=self.device,
                                  dtype=dtype, monitor=monitor)
        with self._state_lock:
            self._compiled[key] = compiled
            while len(self._compiled) > 32:
                self._compiled.popitem(last=False)
        return compiled

    def use_policy(self, policy: PolicyLike | None) -> Policy | None:
        """Swap the active policy without reloading the model. The new policy is validated and compiled
        first; if that fails, the old one stays active. Calls already running keep the policy they began with."""
        compiled = None if policy is None else self.compile_policy(policy)
        with self._state_lock:
            self._active = compiled
        if compiled is not None:
            log.info("policy active: %s %s (%s)", compiled.policy.name, compiled.policy.version, compiled.hash[:12])
        return self.policy

    def _resolve(self, policy: Any, steer: bool) -> CompiledPolicy | None:
        if not isinstance(steer, bool):
            raise InputError(f"steer must be True or False, not {type(steer).__name__}")
        if not steer:
            return None
        if policy is None or policy is _UNSET:
            return self._active
        if isinstance(policy, CompiledPolicy):  # resolved already (a batched row)
            return policy
        _check_policy_like(policy)
        return self.compile_policy(policy)

    # ------------------------------------------------------------------------------------------- inputs
    def _messages(self, prompt: Any) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("the prompt is empty")
            return [{"role": "user", "content": prompt}]
        if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
            raise InputError(f"a prompt is a string or a list of {{'role', 'content'}} messages, not {type(prompt).__name__}")
        if not prompt:
            raise InputError("the message list is empty")
        out: list[dict[str, str]] = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise InputError(f"messages[{i}] must be a mapping with 'role' and 'content', got {m!r:.80}")
            role, content = m["role"], m["content"]
            if role not in _ROLES:
                raise InputError(f"messages[{i}].role is {role!r}; valid roles are {list(_ROLES)}")
            if not isinstance(content, str):
                raise InputError(f"messages[{i}].content must be a string, not {type(content).__name__}")
            _check_text(f"messages[{i}].content", content)
            if role == "system" and i != 0:
                raise InputError(f"messages[{i}] is a system message; only the first message may be one")
            out.append({"role": role, "content": content})
        users = [m for m in out if m["role"] == "user"]
        if not users or not any(m["content"].strip() for m in users):
            raise InputError("the conversation has no non-empty user message")
        if out[-1]["role"] != "user":
            raise InputError(f"the last message must come from the user (it is {out[-1]['role']!r})")
        return out

    def _encode_one(self, prompt: Any, template: bool, turns: str = "all") -> tuple[list[int], list[bool]]:
        """Token ids and a mask of the user's tokens: of every user message (``turns="all"``) or of the last one only
        (``turns="last"``)."""
        if turns not in ("all", "last"):
            raise InputError(f"turns must be 'all' or 'last', not {turns!r}")
        ids, user, last = self.token_masks(prompt, template)
        return ids, (user if turns == "all" else last)

    def token_masks(self, prompt: PromptLike, template: bool = True) -> tuple[list[int], list[bool], list[bool]]:
        """``(ids, user_mask, last_turn_mask)`` of one prompt (a string or a message list) as the engine encodes it:
        the token ids, True on every user message's tokens, and True on the last user message's tokens only (what a
        detector with ``turns: last`` reads). A plain string is one user turn: both masks are equal. Where the chat
        template hides the user's text, every token counts as the user's."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            _check_text("the prompt", prompt)
        if isinstance(prompt, str) and (not template or tok.chat_template is None):
            if not prompt.strip():
                raise InputError("the prompt is empty")
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
            return ids, [True] * len(ids), [True] * len(ids)
        messages = self._messages(prompt)
        if tok.chat_template is None:
            raise InputError(f"the tokenizer of {self.model_name!r} has no chat template; pass a plain string prompt with template=False")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        spans: list[tuple[int, int]] = []
        last: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            at = text.find(m["content"], cursor)
            if at < 0:
                continue
            if m["role"] == "user":
                spans.append((at, at + len(m["content"])))
                if i == len(messages) - 1:  # _messages makes the last message the user's
                    last = [spans[-1]]
            cursor = at + len(m["content"])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if not spans:
            return ids, [True] * len(ids), [True] * len(ids)

        def covered(within: list[tuple[int, int]]) -> list[bool]:
            return [any(s < e2 and e > s2 for s2, e2 in within) for s, e in enc["offset_mapping"]]

        user = covered(spans)
        return ids, user, (covered(last) if last else user)  # the last message not found: every user token

    def _check_fits(self, longest: int, max_new_tokens: int) -> None:
        if self.context_window and longest + max_new_tokens > self.context_window:
            raise InputError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the context window of "
                f"{self.context_window} tokens of {self.model_name!r}; shorten the prompt or lower max_new_tokens"
            )

    def _encode(self, prompts: Sequence[Any], template: bool,
                max_new_tokens: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, attention mask, user-token mask and last-user-turn mask. Each row must fit the context
        window with its own ``max_new_tokens`` (an int, or one per row): positions follow the attention mask, so
        padding costs none."""
        rows = [self.token_masks(p, template) for p in prompts]
        longest = max(len(r[0]) for r in rows)
        max_new = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(rows)
        for r, m in sorted(zip(rows, max_new, strict=True), key=lambda rm: -(len(rm[0][0]) + rm[1]))[:1]:
            self._check_fits(len(r[0]), m)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), longest), dtype=torch.long)
        user = torch.zeros((len(rows), longest), dtype=torch.bool)
        last = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, (r, m, lm) in enumerate(rows):  # left padding
            ids[i, longest - len(r):] = torch.tensor(r)
            attn[i, longest - len(r):] = 1
            user[i, longest - len(r):] = torch.tensor(m)
            last[i, longest - len(r):] = torch.tensor(lm)
        return ids, attn, user, last

    # ----------------------------------------------------------------------------------------- the core
    def _gen_kwargs(self, max_new_tokens: Any, temperature: float | None, stop: Sequence[str] | None, extra: dict[str, Any]) -> dict[str, Any]:
        """``generate``'s keyword arguments (validated); ``max_new_tokens`` may be one per row (the call runs to the
        largest). Stop strings are validated here and applied per row by ``_Rows``."""
        max_new = _max_new_tokens(max_new_tokens)
        temperature = _temperature(temperature)
        _stop_strings(stop)
        max_time = extra.get("max_time")
        if max_time is not None and (isinstance(max_time, bool) or not isinstance(max_time, numbers.Real) or not 0 <= max_time < math.inf):
            raise InputError(f"max_time must be a finite number of seconds >= 0, got {max_time!r}")
        for key in ("num_beams", "num_return_sequences"):
            if extra.get(key, 1) != 1:
                raise InputError(f"{key}={extra[key]} is not supported: steering decides per batch row")
        kw: dict[str, Any] = {"max_new_tokens": max(max_new), "pad_token_id": self.tokenizer.pad_token_id}
        if temperature is not None:
            kw.update(do_sample=True, temperature=temperature)
        elif "do_sample" not in extra:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        kw.update(extra)
        return kw

    def _run(
        self,
        prompts: Sequence[Any],
        policies: Sequence[CompiledPolicy | None],
        *,
        max_new_tokens: int | Sequence[int],
        temperature: float | None,
        stop: Sequence[str] | None,
        template: bool,
        seed: int | None,
        extra: dict[str, Any],
        stops: Sequence[Sequence[str] | None] | None = None,
        stop_when: Sequence[Callable[[], bool] | None] | None = None,
        on_piece: Callable[[int, str], None] | None = None,
        on_done: Callable[[int, GenerationResult], None] | None = None,
        shadows: Sequence[Sequence[CompiledPolicy]] | None = None,
        parents: Sequence[Any] | None = None,
    ) -> list[GenerationResult]:
        """One padded generate call. Per row: ``max_new_tokens`` (an int, or one per row), stop strings (``stops``,
        one list per row, else ``stop`` for all), ``stop_when`` (polled each decode step; True ends the row), and
        ``on_done(row, result)`` as soon as the row ends. The whole call also stops when the calling context was
        cancelled (``_CANCEL``, set by the async methods). Each row gets a trace span (``parents``: one trace context
        per row; default: the current one) that ends with the row."""
        from transformers import StoppingCriteriaList

        t0 = time.perf_counter()
        n = len(prompts)
        max_new = _max_new_tokens(max_new_tokens, n)
        kw = self._gen_kwargs(max_new, temperature, stop, extra)
        row_stops = [_stop_strings(s) for s in stops] if stops is not None else [_stop_strings(stop)] * n
        if len(max_new) != n or len(row_stops) != n or (stop_when is not None and len(stop_when) != n):
            raise InputError(f"per-row settings must give one entry for each of the {n} prompts")
        seed = _seed(seed)
        ids, attn, user, last = self._encode(prompts, template, max_new)
        run = RunState(policies, user, attn, shadows=shadows, last_turn_mask=last)
        cancel = _CANCEL.get()
        whens = [_either(cancel, stop_when[row] if stop_when is not None else None) for row in range(n)]
        eos = self._eos_ids()
        results: list[GenerationResult | None] = [None] * n
        temp = _temperature(temperature)
        spans = [telemetry.start_span("chat", self.model_name, parent=parents[row] if parents is not None else None,
                                      attributes={"gen_ai.request.max_tokens": max_new[row], "gen_ai.request.temperature": temp or 0.0})
                 for row in range(n)]

        def finish(row: int, gen: list[int], reason: str | None) -> None:
            results[row] = r = self._row_result(prompts[row], run, row, gen, reason, max_new[row], row_stops[row], int(attn[row].sum()),
                                                extra.get("max_time") is not None, time.perf_counter() - t0,
                                                opener=force is not None and row in force.forced)
            spans[row].record_result(r)
            spans[row].end()
            if on_done is not None:
                on_done(row, r)

        force: ForceOpener | None = None
        rows = _Rows(self.tokenizer, ids.shape[1], max_new, row_stops, eos, whens, finish, on_piece)
        run.row_done = rows.done  # an ended row's reply is no longer watched
        kw["streamer"] = rows
        kw["stopping_criteria"] = StoppingCriteriaList([rows, *kw.get("stopping_criteria", [])])
        if any(p is not None and p.enforce and any(c.response == "block" for c in p.categories) for p in policies):
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList([*kw.get("logits_processor", []), _EndBlockedRows(run, sorted(eos))])
        if uses_openers(policies):  # refusing rows start with the pack's opener (openers.py); other rows untouched
            from transformers import LogitsProcessorList

            force = ForceOpener(run, self.tokenizer, ids.shape[1], eos)
            kw["logits_processor"] = LogitsProcessorList([*kw.get("logits_processor", []), force])
        dev = self.device
        try:
            with self._model_lock, torch.inference_mode():
                if not all(w is not None and w() for w in whens):  # every row was cancelled while it waited: skip the call
                    if seed is not None:
                        torch.manual_seed(seed)
                    with steering(self.model, run):
                        self.model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), **kw)
        except BaseException as exc:
            for sp in spans:
                sp.error(exc)
                sp.end()
            raise
        rows.end_all()
        return [r for r in results if r is not None]

    def _row_result(self, prompt: Any, run: RunState, row: int, gen: list[int], reason: str | None, max_new: int, stops: list[str],
                    prompt_tokens: int, max_time: bool, total: float, opener: bool = False) -> GenerationResult:
        """One row's reply from its generated tokens and why it ended (see ``_Rows``)."""
        eos = self._eos_ids()
        n = next((i for i, t in enumerate(gen) if t in eos), None)
        gen = gen[:n] if n is not None else gen
        # no end of turn and short of max_new_tokens: stopped by max_time, a closed stream or a cancelled call
        finish = "stop" if n is not None else "length" if len(gen) >= max_new else "time" if max_time and reason is None else "stop"
        text = self.tokenizer.decode(gen, skip_special_tokens=True)
        cut = min((text.index(s) for s in stops if s in text), default=None)
        if cut is not None:
            text, finish = text[:cut], "stop"
        report = SteeringReport.from_run(run, row, total)
        if opener:
            report = dataclasses.replace(report, opener=True)
        if report.blocked:  # its category's message is the reply (blocked at the prompt: nothing was generated)
            in_reply = any(d.fired and d.where == "reply" and d.response == "block" for d in report.decisions)
            text, gen, finish = report.message or "", gen if in_reply else [], "content_filter"
        self._log(prompt, report)
        return GenerationResult(text, report, prompt_tokens, len(gen), finish)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _log(self, prompt: Any, report: SteeringReport) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        record: dict[str, Any] = {
            "policy": report.policy_name,
            "policy_version": report.policy_version,
            "policy_hash": report.policy_hash,
            "mode": report.mode,
            "fired": list(report.fired),
            "scores": {k: round(v, 4) for k, v in report.scores().items()},
            "applied": [f"{a.kind}:{a.category}@{a.layer}" for a in report.applied],
            "latency_s": round(report.timings.get("total", 0.0), 4),
        }
        if self.log_prompts:
            record["prompt"] = prompt
        log.info("decision policy=%s fired=%s", report.policy_name, list(report.fired), extra={"safeguard": record})

    def _one(self, prompt: Any, *, policy: Any, steer: bool, max_new_tokens: int, temperature: float | None,
             stop: Sequence[str] | None, template: bool, seed: int | None, extra: dict[str, Any], shadow: Any = None) -> GenerationResult:
        compiled = self._resolve(policy, steer)
        shadows = self._shadows(compiled, shadow)
        out = self._batched(prompt, compiled, shadows, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                            template=template, seed=seed, extra=extra, stream=False)
        if out is not _UNSET:
            return out
        return self._run([prompt], [compiled], max_new_tokens=max_new_tokens, temperature=temperature, stop=stop, template=template,
                         seed=seed, extra=extra, shadows=[shadows])[0]

    def _shadows(self, compiled: CompiledPolicy | None, shadow: Any) -> list[CompiledPolicy]:
        """The shadow policies of one row, compiled to decide only: ``shadow=`` when given, else the policy's own
        ``shadow`` field (shipped names, or paths relative to the policy's folder)."""
        if shadow is None:
            if compiled is None or not compiled.policy.shadow:
                return []
            p = compiled.policy
            shadow = [s if _is_shipped_name(s) else contained_path(p.base_dir or ".", s, where=f"policy {p.name!r}: shadow") for s in p.shadow]
        elif isinstance(shadow, (str, Path, Policy)):
            shadow = [shadow]
        elif not isinstance(shadow, Sequence):
            raise InputError(f"shadow is a list of policies (names, files or Policy objects), not {type(shadow).__name__}")
        return [self.compile_policy(s, monitor=True) for s in shadow]

    # --------------------------------------------------------------------------------------- public API
    def generate(self, prompt: str, *, max_new_tokens: int = 128, steer: bool = True, policy: PolicyLike | None = None,
                 temperature: float | None = None, stop: Sequence[str] | None = None, template: bool = True,
                 seed: int | None = None, shadow: Sequence[PolicyLike] | None = None, **generation_kwargs: Any) -> GenerationResult:
        """Reply to one prompt. The prompt is sent as a user turn through the chat template (``template=False``
        sends the raw text). ``steer=False`` gives the unsteered model; ``policy=`` overrides the active one.
        ``shadow=["eu"]`` also scores those policies' detectors on the same activations and reports what they would
        have done (``report.shadow``), without acting on them."""
        if not isinstance(prompt, str):
            raise InputError(f"generate takes a string prompt, not {type(prompt).__name__}; use chat() for messages")
        return self._one(prompt, policy=policy, steer=steer, max_new_tokens=max_new_tokens, temperature=temperature,
                         stop=stop, template=template, seed=seed, extra=generation_kwargs, shadow=shadow)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 128, steer: bool = True,
             policy: PolicyLike | None = None, temperature: float | None = None, stop: Sequence[str] | None = None,
             seed: int | None = None, shadow: Sequence[PolicyLike] | None = None, **generation_kwargs: Any) -> GenerationResult:
        """Reply to a conversation of ``{"role", "content"}`` messages (system, user, assistant)."""
        if isinstance(messages, str):
            raise InputError("chat takes a list of messages; use generate() for a string")
        return self._one(list(messages), policy=policy, steer=steer, max_new_tokens=max_new_tokens, temperature=temperature,
                         stop=stop, template=True, seed=seed, extra=generation_kwargs, shadow=shadow)

    def batch(self, prompts: Sequence[PromptLike], *, policies: Sequence[PolicyLike | bool | None] | None = None,
              max_new_tokens: int | Sequence[int] = 128, steer: bool = True, policy: PolicyLike | None = None, temperature: float | None = None,
              stop: Sequence[str] | None = None, stops: Sequence[Sequence[str] | None] | None = None, template: bool = True,
              seed: int | None = None, batch_size: int = 8, shadow: Sequence[PolicyLike] | None = None,
              stop_when: Sequence[Callable[[], bool] | None] | None = None, **generation_kwargs: Any) -> list[GenerationResult]:
        """Reply to many prompts (strings or message lists) in padded batches of ``batch_size``.

        ``policies`` gives each row its own policy (``None`` entries use the active one, ``False`` entries are
        not steered): one padded generate call serves rows under different policies. ``max_new_tokens`` may be one
        per prompt, ``stops`` one list of stop strings per prompt, ``stop_when`` one callable per prompt (True ends
        that row at the next decode step); each row ends at its own limit. Temperature and seed are the call's."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError("batch takes a list of prompts")
        if not prompts:
            return []
        n = len(prompts)
        _batch_size(batch_size)
        compiled = self._row_policies(prompts, policies, policy, steer)
        max_new = _max_new_tokens(max_new_tokens, n)
        row_stops = [_stop_strings(s) for s in stops] if stops is not None else [_stop_strings(stop)] * n
        if len(max_new) != n or len(row_stops) != n or (stop_when is not None and len(stop_when) != n):
            raise InputError(f"max_new_tokens, stops and stop_when need one entry for each of the {n} prompts")
        shadows = [self._shadows(c, shadow) for c in compiled]
        for p in prompts:  # validate every row before generating any
            self._encode_one(p, template)
        out: list[GenerationResult] = []
        for lo in range(0, n, batch_size):
            hi = lo + batch_size
            out += self._run(prompts[lo:hi], compiled[lo:hi], max_new_tokens=max_new[lo:hi], temperature=temperature, stop=None,
                             stops=row_stops[lo:hi], template=template, seed=seed, extra=generation_kwargs, shadows=shadows[lo:hi],
                             stop_when=stop_when[lo:hi] if stop_when is not None else None)
        return out

    def _row_policies(self, prompts: Sequence[Any], policies: Sequence[Any] | None, policy: Any, steer: bool) -> list[CompiledPolicy | None]:
        if policies is not None and len(policies) != len(prompts):
            raise InputError(f"policies has {len(policies)} entries for {len(prompts)} prompts")
        return [None if policies is not None and policies[i] is False
                else self._resolve(policies[i] if policies is not None and policies[i] is not None else policy, steer)
                for i in range(len(prompts))]

    def classify(self, texts: Sequence[PromptLike], *, policy: PolicyLike | None = None, shadow: Sequence[PolicyLike] | None = None,
                 batch_size: int = 8) -> list[SteeringReport]:
        """Which categories fire on each text, without steering or generating: the policy's detectors as a classifier.

        Each text is sent as a user turn (a message list is taken as it is), so the same detectors that gate
        steering can screen inputs before they reach another model, or a model's replies after the fact. Only the
        prompt's forward pass up to the deepest detect layer runs. Returns one report per text (mode
        ``monitor``); ``report.fired`` names the categories and ``report.decisions`` holds every score, equal to
        what generation with the same policy decides."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputError("classify takes a list of texts")
        _batch_size(batch_size)
        pol = self._resolve(policy, True)
        if pol is None:
            raise PolicyError("classify needs a policy: pass policy= or activate one with use_policy()")
        monitor = self.compile_policy(pol.policy, monitor=True)
        shadows = self._shadows(pol, shadow)  # resolved once, not per chunk
        for t in texts:  # validate every row before running any
            self._encode_one(t, True)
        out: list[SteeringReport] = []
        for lo in range(0, len(texts), batch_size):
            out += self._classify_chunk(list(texts[lo:lo + batch_size]), monitor, shadows)
        return out

    def _classify_chunk(self, texts: list[Any], policy: CompiledPolicy, shadows: list[CompiledPolicy]) -> list[SteeringReport]:
        with telemetry.span("classify", self.model_name) as sp:
            reports = self._classify_rows(texts, policy, shadows, sp)
            return reports

    def _classify_rows(self, texts: list[Any], policy: CompiledPolicy, shadows: list[CompiledPolicy], sp: telemetry.Span) -> list[SteeringReport]:
        t0 = time.perf_counter()
        ids, attn, user, last = self._encode(texts, True, 0)
        sp.set_attrs({"gen_ai.usage.input_tokens": int(attn.sum()), "gen_ai.usage.output_tokens": 0})
        run = RunState([policy] * len(texts), user, attn, shadows=[shadows] * len(texts), last_turn_mask=last)
        layers = set(policy.detect_layers) | run.shadow_layers()
        if layers:  # else every category is off: nothing to detect
            dev = self.device
            with self._model_lock, torch.inference_mode(), steering(self.model, run):  # the engine's hooks decide at the detect layers
                forward_until(self.model, decoder_layers(self.model)[max(layers)], input_ids=ids.to(dev),
                              attention_mask=attn.to(dev), position_ids=generate_positions(attn).to(dev))
        total = time.perf_counter() - t0
        reports = [SteeringReport.from_run(run, row, total) for row in range(len(texts))]
        for text, report in zip(texts, reports, strict=True):
            self._log(text, report)
        fired = sorted({c for r in reports for c in r.fired})
        sp.set_attrs({"safeguard.policy.name": policy.policy.name, "safeguard.policy.hash": policy.hash,
                      "safeguard.pack.id": policy.pack.id if policy.pack else None, "safeguard.fired": fired,
                      "safeguard.action": "monitor" if fired else "none"})
        return reports

    def stream(self, prompt: PromptLike, *, max_new_tokens: int = 128, steer: bool = True, policy: PolicyLike | None = None,
               temperature: float | None = None, stop: Sequence[str] | None = None, template: bool = True,
               seed: int | None = None, shadow: Sequence[PolicyLike] | None = None, **generation_kwargs: Any) -> TextStream:
        """Stream a reply as text pieces; the returned ``TextStream`` holds ``.result`` once exhausted.
        Closing it early (or leaving the ``with`` block) stops generation and removes the hooks.
        With batching on, this waits until the row's batch starts."""
        if self._batcher is not None:
            compiled = self._resolve(policy, steer)
            out = self._batched(prompt, compiled, self._shadows(compiled, shadow), max_new_tokens=max_new_tokens, temperature=temperature,
                                stop=stop, template=template, seed=seed, extra=generation_kwargs, stream=True)
            if out is not _UNSET:
                return out
        return self.stream_batch([prompt], max_new_tokens=max_new_tokens, steer=steer, policy=policy, temperature=temperature, stop=stop,
                                 template=template, seed=seed, shadow=shadow, **generation_kwargs)[0]

    def stream_batch(self, prompts: Sequence[PromptLike], *, policies: Sequence[PolicyLike | bool | None] | None = None,
                     max_new_tokens: int | Sequence[int] = 128, steer: bool = True, policy: PolicyLike | None = None,
                     temperature: float | None = None, stop: Sequence[str] | None = None, stops: Sequence[Sequence[str] | None] | None = None,
                     template: bool = True, seed: int | None = None, shadow: Sequence[PolicyLike] | None = None,
                     stop_when: Sequence[Callable[[], bool] | None] | None = None, _parents: Sequence[Any] | None = None,
                     _shadows: Sequence[Sequence[CompiledPolicy] | None] | None = None, **generation_kwargs: Any) -> list[TextStream]:
        """Stream many replies from one padded generate call: one ``TextStream`` per prompt, each ending at its own
        end of turn, stop string or ``max_new_tokens``. Greedy rows equal their single-request text.

        Per row: ``policies`` (as in ``batch``), ``max_new_tokens`` (an int or one per prompt; the call runs to the
        largest), ``stops`` (one list of stop strings per prompt, else ``stop`` for all) and ``stop_when`` (a callable
        polled each decode step; True ends that row). Closing one stream stops its row only. Temperature and seed are
        the call's: one sampler serves every row."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError("stream_batch takes a list of prompts")
        if not prompts:
            return []
        n = len(prompts)
        compiled = self._row_policies(prompts, policies, policy, steer)
        max_new = _max_new_tokens(max_new_tokens, n)
        row_stops = [_stop_strings(s) for s in stops] if stops is not None else [_stop_strings(stop)] * n
        if len(max_new) != n or len(row_stops) != n or (stop_when is not None and len(stop_when) != n):
            raise InputError(f"max_new_tokens, stops and stop_when need one entry for each of the {n} prompts")
        self._gen_kwargs(max_new, temperature, stop, generation_kwargs)  # bad arguments fail here, not inside the thread
        _seed(seed)
        for p in prompts:
            self._encode_one(p, template)
        shadows = [list(_shadows[i]) if _shadows is not None and _shadows[i] is not None else self._shadows(c, shadow)
                   for i, c in enumerate(compiled)]
        batch = _Batch(n)
        parents = list(_parents) if _parents is not None else [telemetry.current_context()] * n  # spans parent to the caller's
        whens = [_either(batch.stopped[row], stop_when[row] if stop_when is not None else None) for row in range(n)]
        streams = [TextStream(batch, row, row_stops[row]) for row in range(n)]
        batch.start(lambda: self._run(prompts, compiled, max_new_tokens=max_new, temperature=temperature, stop=None, stops=row_stops,
                                      template=template, seed=seed, extra=generation_kwargs, stop_when=whens, on_piece=batch.piece,
                                      on_done=batch.end, shadows=shadows, parents=parents))
        return streams

    async def agenerate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """``generate`` in a worker thread. Cancelling the awaiting task stops the generation at its next decode step."""
        return await _cancellable(self.generate, prompt, **kwargs)

    async def achat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> GenerationResult:
        """``chat`` in a worker thread; cancellable as ``agenerate``."""
        return await _cancellable(self.chat, messages, **kwargs)

    async def abatch(self, prompts: Sequence[PromptLike], **kwargs: Any) -> list[GenerationResult]:
        """``batch`` in a worker thread; cancellable as ``agenerate``."""
        return await _cancellable(self.batch, prompts, **kwargs)

    async def astream(self, prompt: PromptLike, **kwargs: Any) -> AsyncIterator[str]:
        """Async text pieces. ``async for piece in llm.astream(...)``; leaving the loop early, or cancelling the task,
        stops the generation."""
        # with batching on, stream() waits for its batch to start: not on the event loop
        s = await asyncio.to_thread(self.stream, prompt, **kwargs) if self._batcher is not None else self.stream(prompt, **kwargs)
        try:
            while True:
                piece = await asyncio.to_thread(s._next_or_none)
                if piece is None:
                    return
                yield piece
        finally:
            await asyncio.to_thread(s.close)


async def _cancellable(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` in a worker thread whose generation stops when the awaiting task is cancelled; the worker has returned
    before the cancellation propagates."""
    cancel = threading.Event()

    def work() -> Any:
        _CANCEL.set(cancel)  # in this thread's copy of the context only
        return fn(*args, **kwargs)

    fut = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait({fut})  # the rows stop at their next decode step
        if not fut.cancelled():
            fut.exception()  # retrieved: an error of the abandoned call is not reported
        raise


class _EndBlockedRows:
    """A logits processor: rows whose policy blocked them (at the prompt, or in the reply: from the token after the
    one that fired) can only emit end-of-turn, so they finish at once while the rest of the batch decodes."""

    def __init__(self, run: RunState, eos: Sequence[int]):
        self._run = run
        self._eos = list(eos)
        self._rows: list[int] | None = None
        self._fires = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._rows is None or self._fires != self._run.reply_fires:
            self._fires = self._run.reply_fires
            self._rows = [r for r in range(self._run.batch_size) if self._run.blocked(r) is not None]
        if not self._rows or not self._eos:
            return scores
        rows = torch.tensor(self._rows, device=scores.device)
        out = scores.clone()
        out[rows] = float("-inf")
        out[rows, self._eos[0]] = 0.0
        return out


def _batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"batch_size must be a positive integer, got {value!r:.40}")
    return value
