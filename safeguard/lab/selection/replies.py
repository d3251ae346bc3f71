"""Detection while the reply is written: each category detector's score over the tokens of a reply, and the
threshold above which a reply fires its category (the pack's ``reply: {threshold}``).

The engine scores generated positions as it scores the prompt: for a ``reduce_first`` detector, each feature's
running maximum over the reply tokens fed back so far, weighed and summed. A prefilled reply reproduces that:
every reply token but the last (the last one is sampled, never fed back), in the context of its prompt.

Thresholds are placed on the unsteered model's own replies: above the highest score of its replies to harmless
select-part prompts, plus a margin of the gap to the median score of its replies to harmful ones (what it says
when nothing stopped it). Validation replies, which placed nothing, measure them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..recording import layer_outputs
from .activations import _left_pad_mask, _token_batches
from .detection import Detector, choose_threshold

__all__ = ["ReplyCalibration", "calibrate_reply_thresholds", "encode_reply", "reply_scores"]


def encode_reply(llm: Any, prompt: Any, reply: str | Sequence[int]) -> tuple[list[int], list[bool]]:
    """Token ids of ``prompt`` (a text or chat messages) with ``reply`` (a text, or the generated token ids)
    prefilled after the generation prompt, and the mask of the reply tokens the engine would have fed back (every
    reply token but the last)."""
    ids, _ = llm._encode_one(prompt, True)
    if isinstance(reply, str):
        rep = llm.tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
    else:
        rep = [int(x) for x in reply]
    mask = [False] * len(ids) + [True] * max(len(rep) - 1, 0) + [False] * min(len(rep), 1)
    return ids + list(rep), mask


@torch.inference_mode()
def reply_scores(llm: Any, pairs: Sequence[tuple[Any, str | Sequence[int]]], detectors: Sequence[Detector], *, layer: int, batch_size: int = 16,
                 max_batch_tokens: int = 4096, progress: bool = False) -> dict[str, torch.Tensor]:
    """Each ``reduce_first`` max detector's score over the reply tokens of each ``(prompt, reply)`` pair (0 rows:
    a reply of fewer than two tokens scores ``-inf``)."""
    from tqdm.auto import tqdm

    union: list[int] = []
    for d in detectors:
        if d.order != "reduce_first" or d.reduce != "max":
            raise ValueError(f"reply scores are defined for reduce_first max detectors, not {d.order}/{d.reduce} ({d.category})")
        union += [f for f in d.features if f not in union]
    enc = llm.saes[layer].encoder(union)
    pooled = torch.full((len(pairs), len(union)), float("-inf"))
    items = sorted(((i, encode_reply(llm, p, r)) for i, (p, r) in enumerate(pairs)), key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc="Reply scores", unit="batch", disable=not progress):
        acts, attn = layer_outputs(llm.model, [ids for _, (ids, _) in batch], [layer], pad_id=pad)
        mask = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        for j, (i, _) in enumerate(batch):
            if mask[j].any():
                pooled[i] = enc(acts[layer][j][mask[j]].to(llm.device)).float().cpu().amax(0)
    out = {}
    for d in detectors:
        cols = torch.tensor([union.index(f) for f in d.features])
        x = pooled[:, cols]
        s = torch.where(torch.isinf(x).any(1), torch.tensor(float("-inf")), torch.nan_to_num(x, neginf=0.0) @ torch.tensor(d.weights))
        out[d.category] = s
    return out


@dataclass(frozen=True)
class ReplyCalibration:
    """Per category: the reply threshold, and what it does on the replies that placed it and on validation ones."""

    thresholds: dict[str, float]
    report: dict[str, dict[str, Any]]


def calibrate_reply_thresholds(benign: Mapping[str, torch.Tensor], harmful: Mapping[str, torch.Tensor], *, margin: float = 0.2,
                               val_benign: Mapping[str, torch.Tensor] | None = None) -> ReplyCalibration:
    """A reply threshold per category from its scores on benign replies (``benign[c]``) and harmful compliance
    replies (``harmful[c]``: replies to the category's own prompts): ``choose_threshold`` at no benign false
    positive and ``margin`` of the gap. ``val_benign`` replies measure the false-positive rate."""
    from .calibration import round_up

    th, rep = {}, {}
    for c in benign:
        neg = benign[c][torch.isfinite(benign[c])]
        pos = harmful.get(c, torch.zeros(0))
        pos = pos[torch.isfinite(pos)]
        t = round_up(choose_threshold(pos, neg, max_fpr=0.0, margin=margin))
        th[c] = t
        vb = val_benign.get(c) if val_benign is not None else None
        rep[c] = {"threshold": t, "n_benign": len(neg), "n_harmful": len(pos),
                  "harmful_compliance_fired": round(float((pos >= t).float().mean()), 3) if len(pos) else None,
                  "val_benign_fired": round(float((vb[torch.isfinite(vb)] >= t).float().mean()), 4) if vb is not None and len(vb) else None}
    return ReplyCalibration(th, rep)
