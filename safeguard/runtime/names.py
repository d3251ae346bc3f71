"""Model names, canonicalised in one place: policies, packs and SAEs name the model they were made for, and a
loaded model is compared with them by this one rule."""

from __future__ import annotations

__all__ = ["canonical_model_name", "same_model"]


def canonical_model_name(name: str) -> str:
    """``meta-llama/Meta-Llama-3-8B-Instruct``, ``Meta-Llama-3-8B-Instruct`` and ``llama-3-8b-instruct`` all become
    ``llama-3-8b-instruct``: the last path part, lower case, without a ``meta-`` prefix, ``_`` read as ``-``."""
    base = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].strip().lower().replace("_", "-")
    return base.removeprefix("meta-")


def same_model(a: str, b: str) -> bool:
    return canonical_model_name(a) == canonical_model_name(b)
