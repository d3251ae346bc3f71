"""Category detectors: logistic probes on pooled SAE features, their thresholds and margins, exact engine scores."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...errors import SelectionError
from ..recording import encode_prompt, layer_outputs
from .activations import _left_pad_mask, _pool, _token_batches


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
                   grid: Sequence[float], *, max_fpr: float, harmful_groups: Sequence[torch.Tensor] = ()) -> dict[str, float]:
    """A detection margin per category, chosen on validation scores (``harmful[c]`` and ``benign[c]`` are category
    c's scores of the validation harmful and benign prompts; ``threshold(c, m)`` its threshold at margin m).

    Every category starts at the largest margin of ``grid``; then, repeatedly, the one move that lowers one
    category's margin and catches the most more harmful prompts (any category firing) is taken, as long as at
    most ``max_fpr`` of the benign prompts fire any category. Moves that catch nothing more are never taken.

    ``harmful_groups`` (index tensors into the harmful prompts, one per source family): then "most caught" is the
    worst group's share caught (ties: the share of all), so margins serve the family detection finds hardest."""
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
        caught = float(h.float().mean()) if len(h) else 0.0
        if harmful_groups:
            caught = min(float(h[g].float().mean()) for g in harmful_groups if len(g)) + 1e-3 * caught
        return caught, float(b.float().mean()) if len(b) else 0.0

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



def _row_weights(n_pos: int, n_neg: int, neg_weight: torch.Tensor | None) -> torch.Tensor:
    """Loss weights of the rows (positives, then negatives): each class sums to 0.5; within the negatives, in
    proportion to ``neg_weight`` (None: equal), so hard negatives can count more without outweighing the positives."""
    pos = torch.full((n_pos,), 0.5 / max(n_pos, 1), dtype=torch.float64)
    if neg_weight is None:
        neg = torch.full((n_neg,), 0.5 / max(n_neg, 1), dtype=torch.float64)
    else:
        nw = torch.as_tensor(neg_weight, dtype=torch.float64).flatten()
        if nw.numel() != n_neg or bool((nw < 0).any()) or float(nw.sum()) <= 0:
            raise SelectionError(f"neg_weight: need {n_neg} non-negative weights with a positive sum, got {nw.numel()}")
        neg = 0.5 * nw / nw.sum()
    return torch.cat([pos, neg])


def fit_probe(positive: torch.Tensor, negative: torch.Tensor, *, l2: float = 1e-2, steps: int = 200,
              neg_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """A logistic probe separating ``positive`` rows (n, k) from ``negative`` rows, classes weighted equally
    (within the negatives: in proportion to ``neg_weight``, default equal), on standardised inputs with an L2
    penalty. Returns weights in the inputs' own units and the bias."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    wt = _row_weights(len(positive), len(negative), neg_weight)
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



def fit_l1_probe(positive: torch.Tensor, negative: torch.Tensor, *, l1: float, steps: int = 2000, tol: float = 1e-9,
                 neg_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """A sparse logistic probe: the loss of ``fit_probe`` (classes weighted equally, standardised inputs) with an L1
    penalty ``l1 * |w|_1`` instead of L2, minimised by accelerated proximal gradient (FISTA); columns it does not
    need get a weight of exactly 0. Returns weights in the inputs' own units and the bias."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    wt = _row_weights(len(positive), len(negative), neg_weight)
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    # step 1/L, L bounding the Lipschitz constant of the smooth part's gradient in (w, b): 0.25 * ||sqrt(wt) [z 1]||_2^2
    zb = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1) * wt.sqrt()[:, None]
    step = 1.0 / (0.25 * float(torch.linalg.matrix_norm(zb, ord=2)) ** 2 + 1e-12)
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    b = torch.zeros((), dtype=torch.float64)
    vw, vb, t = w.clone(), b.clone(), 1.0
    for _ in range(steps):
        r = (torch.sigmoid(z @ vw + vb) - y) * wt
        gw, gb = z.T @ r, r.sum()
        nw = vw - step * gw
        nw = torch.sign(nw) * (nw.abs() - step * l1).clamp(min=0.0)  # the L1 proximal step: soft thresholding
        nb = vb - step * gb
        tn = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        vw, vb = nw + (t - 1.0) / tn * (nw - w), nb + (t - 1.0) / tn * (nb - b)
        done = float((nw - w).abs().max()) < tol and abs(float(nb - b)) < tol
        w, b, t = nw, nb, tn
        if done:
            break
    return (w / sd).float(), float(b - (mu / sd) @ w)


def keep_columns(positive: torch.Tensor, negative: torch.Tensor, *, n_features: int, l2: float = 1e-2, l1: float = 0.0,
                 neg_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The columns a detector keeps: a probe on every column (L2 ``l2``, or sparse with ``l1`` > 0), then at most
    ``n_features`` of those with the largest standardised weights (an L1 probe's zero weights are never kept)."""
    w, _ = (fit_l1_probe(positive, negative, l1=l1, neg_weight=neg_weight) if l1 > 0
            else fit_probe(positive, negative, l2=l2, neg_weight=neg_weight))
    spread = torch.cat([positive, negative]).std(0)
    keep = torch.argsort((w * spread).abs(), descending=True)[:n_features]
    return keep[(w[keep] * spread[keep]).abs() > 1e-8]


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



def fit_detector(positive: torch.Tensor, negative: torch.Tensor, *, n_features: int, l2: float = 1e-2, folds: int = 5,
                 seed: int = 0, l1: float = 0.0, neg_weight: torch.Tensor | None = None) -> DetectorFit:
    """A category detector from pooled candidate features: a probe on all candidates (sparse with ``l1`` > 0), at most
    ``n_features`` with the largest standardised weights kept (``keep_columns``), then ``folds`` L2 probes fitted on
    all but one fold each. The detector is the fold probes' mean; the out-of-fold scores say how prompts a probe
    has not seen score, which is what a threshold must be set on. ``neg_weight``: the negatives' relative loss
    weights (``fit_probe``), e.g. more for benign prompts that look risky."""
    keep = keep_columns(positive, negative, n_features=n_features, l2=l2, l1=l1, neg_weight=neg_weight)
    xp, xn = positive[:, keep], negative[:, keep]
    g = torch.Generator().manual_seed(seed)
    fp = torch.randperm(len(xp), generator=g) % folds
    fn = torch.randperm(len(xn), generator=g) % folds
    sp, sn = torch.zeros(len(xp)), torch.zeros(len(xn))
    weights = []
    for k in range(folds):
        wk, _ = fit_probe(xp[fp != k], xn[fn != k], l2=l2, neg_weight=None if neg_weight is None else torch.as_tensor(neg_weight)[fn != k])
        sp[fp == k] = xp[fp == k] @ wk
        sn[fn == k] = xn[fn == k] @ wk
        weights.append(wk)
    return DetectorFit(keep.tolist(), torch.stack(weights).mean(0), sp, sn)



@dataclass(frozen=True)
class Detector:
    """One category's detection rule: a weighted sum of features, with ``reduce`` over the user's tokens applied
    per token score (``combine_first``) or per feature (``reduce_first``), as in a policy's ``detect`` block."""

    category: str
    features: list[int]
    weights: list[float]
    reduce: str = "mean"
    order: str = "combine_first"
    last_weights: list[float] | None = None
    """Weights of the features at the last user token, added (``reduce_first`` only; the pack's ``detect.last_weights``)."""

    def key(self) -> dict[str, Any]:
        """The detector as a cache key: without ``last_weights`` when unset, so keys made before it existed still hit."""
        out = asdict(self)
        if self.last_weights is None:
            del out["last_weights"]
        return out



@torch.inference_mode()
def pooled_features(llm: Any, prompts: Sequence[str], features: Sequence[int], *, layer: int, reduce: str = "mean", batch_size: int = 16,
                    max_batch_tokens: int = 4096, progress: bool = False, desc: str = "Pooling features",
                    last: bool = False, window: int | None = None) -> Any:
    """(prompts, features): each feature's activation pooled over each prompt's user tokens. Only the named
    features are encoded (their sliced encoder), so this stays small. ``last=True``: a pair, the pooled features
    and the features at each prompt's last user token (the last position of the mask the engine reads), from
    the same forward passes. ``window``: only each mask's last ``window`` tokens are read (``Detect.window``)."""
    from tqdm.auto import tqdm

    from ...runtime.steering import last_positions

    enc = llm.saes[layer].encoder(list(features))
    out = torch.zeros(len(prompts), len(features))
    at_last = torch.zeros(len(prompts), len(features))
    items = sorted(((i, encode_prompt(llm, p, window=window)) for i, p in enumerate(prompts)), key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc=desc, unit="batch", disable=not progress):
        acts, attn = layer_outputs(llm.model, [ids for _, (ids, _) in batch], [layer], pad_id=pad)
        user = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        f = enc(acts[layer][user].to(llm.device)).float()
        rows = torch.tensor([i for i, _ in batch])
        out[rows] = _pool(f, user.nonzero()[:, 0], len(batch), reduce)
        if last:
            h = acts[layer][torch.arange(len(batch)), last_positions(user)]  # (B, d)
            at_last[rows] = enc(h.to(llm.device)).float().cpu()
    return (out, at_last) if last else out



@torch.inference_mode()
def detection_scores(llm: Any, prompts: Sequence[str], detectors: Sequence[Detector], *, layer: int, batch_size: int = 16,
                     max_batch_tokens: int = 4096, progress: bool = False, desc: str = "Scoring", window: int | None = None) -> dict[str, torch.Tensor]:
    """Each detector's score on each prompt, computed as the steering engine computes it (``combine: sum`` with
    weights, then the detector's ``reduce`` over the user's tokens, the last ``window`` of them when given). Keys are the
    detectors' ``category`` (distinct)."""
    from tqdm.auto import tqdm

    from ...runtime.steering import detection_score

    if len({d.category for d in detectors}) != len(detectors):
        raise SelectionError(f"detectors must have distinct category names, got {[d.category for d in detectors]}")
    union: list[int] = []
    for d in detectors:
        union += [f for f in d.features if f not in union]
    enc = llm.saes[layer].encoder(union)
    out = {d.category: torch.zeros(len(prompts)) for d in detectors}
    items = sorted(((i, encode_prompt(llm, p, window=window)) for i, p in enumerate(prompts)), key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for batch in tqdm(_token_batches(items, batch_size, max_batch_tokens), desc=desc, unit="batch", disable=not progress):
        acts, attn = layer_outputs(llm.model, [ids for _, (ids, _) in batch], [layer], pad_id=pad)
        user = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        f = enc(acts[layer].to(llm.device)).float().cpu()  # (B, T, k)
        for d in detectors:
            idx = torch.tensor([union.index(x) for x in d.features])
            score = detection_score(f[..., idx], user, weights=torch.tensor(d.weights), combine="sum", reduce=d.reduce, order=d.order,
                                    last_weights=torch.tensor(d.last_weights) if d.last_weights is not None else None)
            for j, (i, _) in enumerate(batch):
                out[d.category][i] = score[j]
    return out

