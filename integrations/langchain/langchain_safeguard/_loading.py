"""One loaded ``SteeredLLM`` per (model, SAE, quantization, device), shared by every ``ChatSafeguard`` that asks.

Loading is lazy and happens once: the first caller of a key loads it while holding that key's lock, later
callers of the same key wait for it, and callers of other keys are not blocked. The shared instance's own
active policy is never changed here; each request names its policy, so instances with different policies
share one model safely.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from safeguard import SteeredLLM

__all__ = ["clear_shared", "shared_key", "shared_llm"]

Key = tuple[str | None, tuple[str, ...] | None, str | None, str]

_shared: dict[Key, SteeredLLM] = {}
_locks: dict[Key, threading.Lock] = {}
_guard = threading.Lock()


def shared_key(model: str | None, sae: str | Sequence[str] | None, quantization: str | None, device: str | None) -> Key:
    """The cache key: ``device=None`` and ``"auto"`` resolve to the device they pick, so they share."""
    from safeguard.runtime.models import resolve_device

    saes = None if sae is None else ((str(sae),) if isinstance(sae, str) else tuple(str(s) for s in sae))
    return (None if model is None else str(model), saes, quantization, str(resolve_device(device)))


def shared_llm(model: str | None = None, sae: str | Sequence[str] | None = None, quantization: str | None = None,
               device: str | None = None) -> SteeredLLM:
    """The shared ``SteeredLLM`` for this model and SAE, loaded on first use."""
    key = shared_key(model, sae, quantization, device)
    with _guard:
        if key in _shared:
            return _shared[key]
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        with _guard:
            if key in _shared:
                return _shared[key]
        sae_arg: Any = None if key[1] is None else (key[1][0] if len(key[1]) == 1 else list(key[1]))
        llm = SteeredLLM.from_pretrained(model, sae=sae_arg, quantization=quantization, device=key[3])
        with _guard:
            _shared[key] = llm
        return llm


def clear_shared() -> None:
    """Forget every shared model (they are freed once no ``ChatSafeguard`` holds them)."""
    with _guard:
        _shared.clear()
        _locks.clear()
