"""The lab's on-disk cache format: one safetensors file, never a pickle.

Tensors are stored as safetensors tensors; everything around them (dataclasses, dicts, lists, numbers, strings) is
a tagged JSON tree kept in the file's metadata. Reading a cache file builds only tensors, JSON values and the few
types named in ``_TYPES``, so a planted or corrupt file cannot run code: at worst it fails to load, and
``cached`` then logs a warning and recomputes the value.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("safeguard")

SUFFIX = ".safetensors"
_META = "safeguard.cache"
_VERSION = 1


class CacheFormatError(ValueError):
    """A cache file that is not (or no longer) in this format."""


def _types() -> dict[str, type]:
    from .selection.activations import PromptStats, ReplyStats
    from .selection.stats import GroupSummary, RunningStats

    return {"PromptStats": PromptStats, "ReplyStats": ReplyStats, "GroupSummary": GroupSummary, "RunningStats": RunningStats}


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # a copy of its own: safetensors refuses tensors that share storage (GroupSummary(0, z, z, z), views)
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, dict):  # a list of pairs keeps int keys and the order
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    name = type(value).__name__
    if _types().get(name) is not type(value):
        raise TypeError(f"the lab cache cannot store a {type(value).__qualname__}")
    if hasattr(value, "state_dict"):
        state = value.state_dict()
    elif is_dataclass(value):
        state = {f.name: getattr(value, f.name) for f in fields(value)}
    else:  # pragma: no cover - every registered type is one of the two
        raise TypeError(f"the lab cache cannot store a {name}")
    return {"type": name, "state": _encode(state, tensors)}


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise CacheFormatError(f"unexpected node {str(node)[:80]!r}")
    if set(node) == {"tensor"}:
        if node["tensor"] not in tensors:
            raise CacheFormatError(f"no tensor {node['tensor']!r}")
        return tensors[node["tensor"]]
    if set(node) == {"tuple"} and isinstance(node["tuple"], list):
        return tuple(_decode(v, tensors) for v in node["tuple"])
    if set(node) == {"dict"} and isinstance(node["dict"], list):
        out: dict[Any, Any] = {}
        for pair in node["dict"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CacheFormatError("a dict entry is not a [key, value] pair")
            key = _decode(pair[0], tensors)
            if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                raise CacheFormatError(f"unhashable key {key!r}")
            out[key] = _decode(pair[1], tensors)
        return out
    if set(node) == {"type", "state"}:
        cls = _types().get(node["type"]) if isinstance(node["type"], str) else None
        state = _decode(node["state"], tensors)
        if cls is None or not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CacheFormatError(f"unknown type {node['type']!r}")
        if hasattr(cls, "from_state_dict"):
            return cls.from_state_dict(state)
        names = {f.name for f in fields(cls)}
        if set(state) != names:
            raise CacheFormatError(f"{node['type']}: fields {sorted(state)}, expected {sorted(names)}")
        return cls(**state)
    raise CacheFormatError(f"unexpected node {str(node)[:80]!r}")


def save(value: Any, path: str | os.PathLike[str]) -> None:
    """Write ``value`` (tensors, the lab's statistics dataclasses, dicts, lists, tuples, numbers, strings, None) to
    ``path`` as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(value, tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={_META: json.dumps({"version": _VERSION, "value": tree}, allow_nan=True)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike[str]) -> Any:
    """Read a value written by ``save``. Builds only tensors, JSON values and the lab's statistics types; anything
    else raises (``CacheFormatError``, or safetensors' own error for a file that is not safetensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if _META not in meta:
            raise CacheFormatError(f"{path}: not a safeguard cache file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = json.loads(meta[_META])
    if not isinstance(head, dict) or head.get("version") != _VERSION or "value" not in head:
        raise CacheFormatError(f"{path}: cache format {head.get('version') if isinstance(head, dict) else head!r}, expected {_VERSION}")
    return _decode(head["value"], tensors)


def cached(path: str | os.PathLike[str], make: Callable[[], Any]) -> Any:
    """The value cached at ``path`` (a ``.safetensors`` file), else ``make()``, written there. A file that does not
    load (an old pickle, a planted or a corrupt file) is never executed: it is logged, recomputed and overwritten."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"cache files end in {SUFFIX}, not {path.name!r}")
    if path.is_file():
        try:
            return load(path)
        except Exception as exc:
            log.warning("ignoring the unreadable cache file %s (%s: %s); recomputing it", path, type(exc).__name__, str(exc)[:200])
    value = make()
    try:
        save(value, path)
    except OSError as exc:
        log.warning("could not write the cache file %s (%s); continuing without it", path, exc)
    return value


def read_json_cache(path: str | os.PathLike[str]) -> Any:
    """A JSON cache file's content, or ``None`` when it is missing or unreadable (logged: it will be regenerated).
    JSON, never a pickle: reading it cannot run code."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable cache %s (%s); regenerating it", p, exc)
        return None
