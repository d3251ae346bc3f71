"""Forward passes that capture layer outputs, and the streamed statistics of prompts and of prefilled replies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import SelectionError
from ..recording import compliance_replies, encode_prompt, layer_outputs, tail  # noqa: F401  (compliance_replies: re-exported)
from .stats import RunningStats


def _token_batches(items: Sequence[Any], batch_size: int, max_tokens: int) -> list[Any]:
    """Consecutive batches of ``items`` (sorted by length; ``item[1][0]`` are the token ids) of at most
    ``batch_size`` items and about ``max_tokens`` padded tokens (one long item still gets a batch of its own)."""
    out, lo = [], 0
    while lo < len(items):
        hi = lo + 1
        while hi < len(items) and hi - lo < batch_size and (hi - lo + 1) * len(items[hi][1][0]) <= max_tokens:
            hi += 1
        out.append(items[lo:hi])
        lo = hi
    return out



def _left_pad_mask(masks: Sequence[Sequence[bool]], width: int) -> torch.Tensor:
    out = torch.zeros((len(masks), width), dtype=torch.bool)
    for i, m in enumerate(masks):
        out[i, width - len(m):] = torch.tensor(list(m), dtype=torch.bool)
    return out



def _encode_reply(tokenizer: Any, prompt: str, reply: str) -> tuple[list[int], list[bool]]:
    """Token ids of a chat with the assistant's ``reply`` prefilled, and a mask of the reply's tokens. The text
    is the generation prompt followed by the reply, exactly what the model sees while it writes that reply."""
    if getattr(tokenizer, "chat_template", None):
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        prefix = f"User: {prompt}\nAssistant: "
    text = prefix + reply
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    lo = len(prefix)
    return list(enc["input_ids"]), [e > lo for _, e in enc["offset_mapping"]]



def _sae_encode(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Full SAE activations (tokens, d_sae), float32, on the SAE's device."""
    s = sae.sae
    return s.encode(x.to(s.W_enc.device, s.W_enc.dtype)).float()



def _pool(feats: torch.Tensor, row_of: torch.Tensor, rows: int, reduce: str) -> torch.Tensor:
    """Per-row max or mean of token rows ``feats`` (tokens, d) whose batch row is ``row_of``; on the CPU."""
    idx = row_of.to(feats.device)
    out = torch.zeros(rows, feats.shape[1], device=feats.device)
    if reduce == "max":
        out = out.scatter_reduce(0, idx[:, None].expand_as(feats), feats, "amax", include_self=False)
    elif reduce == "mean":
        out = out.index_add(0, idx, feats) / torch.bincount(idx, minlength=rows).clamp(min=1)[:, None].to(feats.dtype)
    else:
        raise SelectionError(f"reduce must be 'max' or 'mean', not {reduce!r}")
    return out.cpu()



@dataclass
class PromptStats:
    """What the first pass over chat-formatted prompts measured."""

    detect: RunningStats
    """Detect-layer SAE features pooled over the user's tokens (mean by default), one row per prompt."""
    resid: RunningStats
    """Steer-layer residual, mean over the user's tokens, one row per prompt (for redirect vectors)."""
    resid_norm: float
    """Mean L2 norm of the steer-layer residual on user tokens: the unit of steering strengths."""



def collect_prompt_stats(llm: Any, groups: Mapping[str, Sequence[str]], *, detect_layer: int, steer_layer: int, batch_size: int = 16,
                         reduce: str = "mean", detect_only: Mapping[str, Sequence[str]] | None = None, max_batch_tokens: int = 4096,
                         progress: bool = True, window: int | None = None) -> PromptStats:
    """Stream chat-formatted prompts of each group through the model and the detect-layer SAE. ``detect_only``
    groups (jailbreak-wrapped prompts, say) join the detect-layer statistics only: the residual means and the
    residual norm, the unit of steering strengths, come from ``groups``. Batches hold at most ``batch_size``
    prompts and about ``max_batch_tokens`` tokens. ``window``: the detect-layer features read only the last ``window``
    user tokens (``Detect.window``); the residual statistics keep every user token."""
    from tqdm.auto import tqdm

    sae = llm.saes[detect_layer]
    detect_only = dict(detect_only or {})
    names = list(groups)
    clash = sorted(set(names) & set(detect_only))
    if clash:
        raise SelectionError(f"groups {clash} are given twice (groups and detect_only)")
    detect = RunningStats(sae.d_sae, names + list(detect_only))
    resid = RunningStats(llm.hidden_size, names)
    items = [(g, encode_prompt(llm, t)) for g in names for t in groups[g]]
    items += [(g, encode_prompt(llm, t)) for g in detect_only for t in detect_only[g]]
    items = [(g, (ids, (mask, tail(mask, window)))) for g, (ids, mask) in items]
    items.sort(key=lambda it: len(it[1][0]))
    norm_sum, norm_n = 0.0, 0
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc="Prompt statistics", unit="batch", disable=not progress):
        acts, attn = layer_outputs(llm.model, [ids for _, (ids, _) in batch], sorted({detect_layer, steer_layer}), pad_id=pad)
        user = _left_pad_mask([m for _, (_, (m, _)) in batch], attn.shape[1])
        read = _left_pad_mask([w for _, (_, (_, w)) in batch], attn.shape[1])  # what detection reads
        hd, hs = acts[detect_layer], acts[steer_layer]
        feats = _sae_encode(sae, hd[read])  # (tokens, d_sae)
        per_row = _pool(feats, read.nonzero()[:, 0], len(batch), reduce)
        row_of = user.nonzero()[:, 0]
        plain = torch.tensor([g in groups for g, _ in batch])
        tok = hs[user & plain[:, None]]
        norm_sum += float(tok.norm(dim=-1).sum())
        norm_n += tok.shape[0]
        mean_rows = torch.zeros(len(batch), hs.shape[-1]).index_add(0, row_of, hs[user]) / user.sum(1, keepdim=True).clamp(min=1)
        for g in detect.groups:
            rows = [i for i, (gi, _) in enumerate(batch) if gi == g]
            if rows:
                detect.update(g, per_row[rows])
                if g in groups:
                    resid.update(g, mean_rows[rows])
    return PromptStats(detect, resid, norm_sum / max(norm_n, 1))



@dataclass
class ReplyStats:
    """What the pass over prefilled refusal and compliance replies measured, per reply token."""

    sae: RunningStats
    resid: RunningStats

    def refusal_direction(self) -> torch.Tensor:
        """The dense refusal direction: mean residual on refusal tokens minus on compliance tokens."""
        return (self.resid.summary("refusal").mean - self.resid.summary("compliance").mean).float()



def collect_reply_stats(llm: Any, pairs: Sequence[tuple[str, str, str]], *, layer: int, batch_size: int = 16, progress: bool = True) -> ReplyStats:
    """Stream ``(prompt, refusal, compliance)`` chats with the reply prefilled; statistics over the reply tokens."""
    from tqdm.auto import tqdm

    sae = llm.saes[layer]
    stats = RunningStats(sae.d_sae, ["refusal", "compliance"])
    resid = RunningStats(llm.hidden_size, ["refusal", "compliance"])
    items = [(g, _encode_reply(llm.tokenizer, p, r)) for p, refusal, comply in pairs for g, r in (("refusal", refusal), ("compliance", comply))]
    items.sort(key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for lo in tqdm(range(0, len(items), batch_size), desc="Reply statistics", unit="batch", disable=not progress):
        batch = items[lo:lo + batch_size]
        acts, attn = layer_outputs(llm.model, [ids for _, (ids, _) in batch], [layer], pad_id=pad)
        mask = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        for g in ("refusal", "compliance"):
            rows = torch.tensor([i for i, (gi, _) in enumerate(batch) if gi == g], dtype=torch.long)
            if len(rows) == 0:
                continue
            h = acts[layer][rows][mask[rows]]
            if h.shape[0]:
                stats.update(g, _sae_encode(sae, h))
                resid.update(g, h)
    return ReplyStats(stats, resid)
