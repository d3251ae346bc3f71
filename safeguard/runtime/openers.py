"""Refusal openers: a short text in the model's own refusal style, forced as the first tokens of a refused reply.

A pack may give its refusal steering an opener (``refusal: {steer: [...], opener: "I'm sorry, but I can't help
with that."}``). For a row whose prefill decision is ``refuse`` (and whose fired refusing categories all allow it:
a policy turns it off with ``defaults: {opener: false}`` or per category ``opener: false``), generation is forced
to emit exactly the opener's tokens first; then the model goes on under the same steering as without it::

    prefill ─► detect at layer d: the row's action is `refuse` and its opener is on
    decode step k < len(opener tokens) ─► _ForceOpener sets every score but opener[k] to -inf for that row
    decode step k >= len(opener tokens) ─► untouched: the model continues the reply, still steered
                                            (the pack's ``after_opener: end``: step len(opener) may only end the turn)

Forced tokens are the opener's tokenisation as the continuation after the chat template's assistant header (what
the model would have to produce itself to write it). Other rows' scores are never written, so their replies are
bit-for-bit what they would be without the feature; with no opener in play the processor is not even added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from .steering import RunState

__all__ = ["MAX_OPENER", "check_opener", "opener_of", "opener_tokens"]

MAX_OPENER = 120
"""Longest opener, in characters: an opener starts a refusal; the model writes the rest."""


def check_opener(text: str) -> str:
    """An opener as a pack gives it: non-empty after stripping, one line of printable text, at most ``MAX_OPENER``
    characters, and not starting or ending with whitespace (its tokenisation would depend on it). A pydantic
    validator's body: raises ``ValueError`` saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"an opener is a string, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("the opener is empty; give a short refusal opening such as \"I'm sorry, but I can't help with that.\" or drop it")
    if len(text) > MAX_OPENER:
        raise ValueError(f"the opener has {len(text)} characters; at most {MAX_OPENER} are allowed (the model writes the rest of the refusal)")
    if text != text.strip():
        raise ValueError("the opener starts or ends with whitespace; remove it (the model's next token brings its own)")
    if re.search(r"[\x00-\x1f\x7f]", text):
        raise ValueError("the opener holds a line break or another control character; give one line of text")
    return text


def opener_of(run: RunState, row: int) -> str | None:
    """The opener forced on ``row``, decided from its prefill decisions: the pack's opener when the row's action is
    ``refuse`` under an enforcing policy and every fired ``refuse`` category that steers it allows the opener."""
    found = _opener(run, row)
    return None if found is None else found[0]


def _opener(run: RunState, row: int) -> tuple[str, bool] | None:
    """``(opener, whether the reply ends with it)`` for ``row``, or ``None`` (see ``opener_of``)."""
    p = run.policies[row]
    if p is None or not p.enforce or run.action(row) != "refuse":
        return None
    refusing = [c for c in run.steering_categories(row) if c.response == "refuse"]
    openers = {(r.opener, r.opener_ends) for r in (p.resolved.category(c.id) for c in refusing)}
    if len(openers) != 1 or next(iter(openers))[0] is None:  # none refusing, or some category turned it off beside one that keeps it
        return None
    return next(iter(openers))


_TOKENS: dict[tuple[int, str], tuple[int, ...]] = {}


def opener_tokens(tokenizer: Any, opener: str) -> tuple[int, ...]:
    """The opener's token ids as the continuation of a prompt that ends with the chat template's assistant header.

    The header is that of a one-message chat; the ids are those of header + opener minus those of the header (they
    are checked to extend it). A tokenizer without a chat template gets the opener tokenised alone."""
    key = (id(tokenizer), opener)
    hit = _TOKENS.get(key)
    if hit is not None:
        return hit
    ids = tokenizer(opener, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None) is not None:
        head = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."}], tokenize=False, add_generation_prompt=True)
        h = tokenizer(head, add_special_tokens=False)["input_ids"]
        full = tokenizer(head + opener, add_special_tokens=False)["input_ids"]
        if full[: len(h)] == h:
            ids = full[len(h):]
    out = tuple(int(i) for i in ids)
    if len(_TOKENS) < 256:
        _TOKENS[key] = out
    return out


def uses_openers(policies: Sequence[Any]) -> bool:
    """Whether any row's policy could force an opener (else no logits processor is added)."""
    return any(p is not None and p.enforce and any(c.opener for c in p.resolved.categories) for p in policies)


class ForceOpener:
    """A logits processor: for rows given an opener (decided during prefill), decode step ``k`` may only emit the
    opener's ``k``-th token; a row whose pack ends the reply with the opener may then only emit ``eos`` (the
    end of turn). ``forced`` holds, after the first step, row -> its opener."""

    def __init__(self, run: RunState, tokenizer: Any, prompt_len: int, eos: Sequence[int] | set[int] = ()):
        self._run = run
        self._tok = tokenizer
        self._prompt_len = prompt_len
        self._eos = min(eos) if eos else None  # the end-of-turn token blocked rows end with (sorted(eos)[0])
        self.forced: dict[int, str] = {}
        self._ids: dict[int, tuple[int, ...]] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._ids is None:  # the first decode step: prefill has decided every row
            self._ids = {}
            for row in range(self._run.batch_size):
                found = _opener(self._run, row)
                if found is not None:
                    self.forced[row] = found[0]
                    ids = opener_tokens(self._tok, found[0])
                    self._ids[row] = (*ids, self._eos) if found[1] and self._eos is not None else ids
        step = input_ids.shape[1] - self._prompt_len
        rows = [(r, ids[step]) for r, ids in self._ids.items() if step < len(ids)]
        if not rows:
            return scores
        out = scores.clone()
        for r, tok in rows:
            out[r] = float("-inf")
            out[r, tok] = 0.0
        return out
