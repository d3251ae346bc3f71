"""Leave-one-source-out validation: how detectors fitted on some prompt sources do on a source they never saw.

A detector learned on AdvBench's "Write a tutorial on how to ..." and Do-Not-Answer's questions may learn the
phrasing, not the harm. So selection holds out one *source family* at a time (``advbench``, ``donotanswer``,
``harmful_plain``: the part of ``Prompt.source`` before a ``/``), picks candidate features and fits every
category's detector on the other families only, and measures it on the held-out family's prompts:

- per category, the AUC of its detector against validation benign prompts and the recall at a threshold that
  lets ``fpr`` of them fire (``threshold_at``);
- for the family as a whole, the share of its harmful prompts that fire any category (``recall_any``).

Each detector configuration (``DetectConfig``: candidate count, kept features, L2) is scored by its *worst*
held-out family, never the average, and the best one is fitted on every family for the pack. Validation
benign prompts placed no feature and fitted no probe; they only place the thresholds of this comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import SelectionError
from .detection import fit_probe, keep_columns

__all__ = ["DetectConfig", "FoldResult", "Generalization", "auc", "family", "leave_one_source_out", "threshold_at"]


def family(source: str) -> str:
    """A prompt source's family: ``donotanswer/malicious_uses`` -> ``donotanswer``."""
    return source.split("/", 1)[0]


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    p, n = positive.double()[:, None], negative.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def threshold_at(negative: torch.Tensor, fpr: float) -> float:
    """The lowest threshold (``score >= threshold`` fires) at which at most ``fpr`` of ``negative`` fire."""
    neg = negative.flatten().sort(descending=True).values
    k = int(fpr * len(neg) + 1e-9)  # this many may fire
    if k >= len(neg):
        return float(neg[-1])
    return float(torch.nextafter(neg[k], torch.tensor(float("inf"), dtype=neg.dtype)))  # just above, in the scores' own precision


@dataclass(frozen=True)
class DetectConfig:
    """One way to build a category detector from pooled candidate features."""

    n_candidates: int
    """Features per category taken from the composite ranking (category vs harmless)."""
    n_features: int
    """Of those, the ones with the largest standardised probe weights kept (probe inputs: with ``pool: max+last`` a
    feature's pooled and last-token activations are two)."""
    l2: float
    """The probe's L2 penalty (on standardised inputs)."""
    l1: float = 0.0
    """> 0: the features are chosen by a sparse probe with this L1 penalty instead (its non-zero weights, at most
    ``n_features`` of them), then fitted with ``l2`` on those."""
    pool: str = "max"
    """``max``: the features pooled over the user's tokens (``SelectConfig.detect_reduce``); ``max+last``: those and the
    same candidates at the last user token, one probe over both (the pack's ``detect.last_weights``)."""

    def __post_init__(self) -> None:
        if self.n_candidates < 1 or not 1 <= self.n_features <= self.n_candidates * (2 if self.pool == "max+last" else 1) \
                or not self.l2 >= 0 or not self.l1 >= 0:
            raise SelectionError(f"a detector configuration needs 1 <= n_features <= n_candidates (twice that with pool 'max+last'), "
                                 f"l2 >= 0 and l1 >= 0, got {self}")
        if self.pool not in POOLS:
            raise SelectionError(f"a detector configuration's pool is one of {list(POOLS)}, not {self.pool!r}")

    @property
    def name(self) -> str:
        return (f"top{self.n_candidates}->{self.n_features}, l2={self.l2:g}" + (f", l1={self.l1:g}" if self.l1 > 0 else "")
                + (", +last token" if self.pool == "max+last" else ""))

    @property
    def last(self) -> bool:
        """Does this configuration read the last user token too?"""
        return self.pool == "max+last"

    def columns(self, cols: Sequence[int], width: int) -> list[int]:
        """The design-matrix columns of candidate columns ``cols`` of a pooled matrix ``width`` wide: ``cols``, then for
        ``max+last`` the same columns of the last-token block that follows it."""
        return list(cols) + ([c + width for c in cols] if self.last else [])


POOLS = ("max", "max+last")
"""A detector configuration's inputs (``DetectConfig.pool``)."""


@dataclass(frozen=True)
class FoldResult:
    """One configuration, one held-out family."""

    held_out: str
    n: int
    """Harmful prompts of the held-out family (in the pack's categories)."""
    recall_any: float
    """Share of them firing any category at the per-category thresholds."""
    benign_any: float
    """Share of validation benign prompts firing any category at those thresholds."""
    per_category: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    """Category -> {n, auc, recall} on the held-out family's prompts of that category, and ``features``: how many
    distinct SAE features its detector read."""


@dataclass
class Generalization:
    """Every configuration's held-out results and the one chosen by its worst family."""

    folds: dict[str, list[FoldResult]]
    """Configuration name -> one result per held-out family."""
    configs: dict[str, DetectConfig]
    chosen: str
    fpr: float
    families: dict[str, int]
    """Family -> harmful prompts (select and validation parts) in the pack's categories."""

    def worst(self, name: str) -> float:
        return min(r.recall_any for r in self.folds[name])

    def mean(self, name: str) -> float:
        return sum(r.recall_any for r in self.folds[name]) / len(self.folds[name])

    def to_json(self) -> dict[str, Any]:
        return {"rule": (f"each configuration is fitted per held-out family on the other families' select-part prompts; thresholds let "
                         f"{self.fpr:.0%} of validation benign prompts fire each category; the configuration with the highest worst-family "
                         "recall (any category) is chosen, ties by the mean"),
                "fpr": self.fpr, "families": self.families, "chosen": self.chosen,
                "configs": {k: {**asdict(c), "worst_recall_any": round(self.worst(k), 4), "mean_recall_any": round(self.mean(k), 4),
                                "folds": [asdict(r) for r in self.folds[k]]} for k, c in self.configs.items()}}

    def markdown(self) -> str:
        fams = [r.held_out for r in self.folds[self.chosen]]
        lines = ["# Leave-one-source-out validation", "",
                 f"Detectors fitted without the held-out family, thresholds at {self.fpr:.0%} of validation benign prompts per category. "
                 "Recall: share of the held-out family's harmful prompts firing any category.", "",
                 "| configuration | " + " | ".join(f"{f} (n={self.families[f]})" for f in fams) + " | worst | mean | benign any |",
                 "|---|" + "---|" * (len(fams) + 3)]
        for k in self.folds:
            rs = {r.held_out: r for r in self.folds[k]}
            mark = " **(chosen)**" if k == self.chosen else ""
            lines.append(f"| {k}{mark} | " + " | ".join(f"{rs[f].recall_any:.1%}" for f in fams)
                         + f" | {self.worst(k):.1%} | {self.mean(k):.1%} | {max(r.benign_any for r in self.folds[k]):.1%} |")
        lines += ["", f"## Per category, chosen configuration ({self.chosen}): AUC / recall at {self.fpr:.0%} benign per held-out family", "",
                  "| category | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
        rs = {r.held_out: r for r in self.folds[self.chosen]}
        cats = sorted({c for r in self.folds[self.chosen] for c in r.per_category})
        for c in cats:
            cells = []
            for f in fams:
                pc = rs[f].per_category.get(c)
                cells.append("-" if not pc or not pc["n"] else f"{pc['auc']:.2f} / {pc['recall']:.0%} (n={pc['n']})")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Held-out recall per family for every configuration (bars), worst family marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.folds)
        fams = [r.held_out for r in self.folds[names[0]]]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 3.6))
        width = 0.8 / len(fams)
        for j, f in enumerate(fams):
            vals = [next(r.recall_any for r in self.folds[k] if r.held_out == f) for k in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"held out: {f}")
        ax.scatter([i + 0.4 - width / 2 for i in range(len(names))], [self.worst(k) for k in names], color="black", marker="_", s=300,
                   label="worst family", zorder=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], [k.replace(", ", "\n") for k in names], fontsize=7)
        ax.set_ylabel("held-out harmful firing any category")
        ax.set_ylim(0, 1)
        ax.set_title(f"leave-one-source-out (chosen: {self.chosen}; thresholds at {self.fpr:.0%} benign)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _fit(pos: torch.Tensor, neg: torch.Tensor, cfg: DetectConfig) -> tuple[list[int], torch.Tensor]:
    """The columns ``keep_columns`` keeps (L2 or sparse probe), refitted on them with ``cfg.l2``."""
    keep = keep_columns(pos, neg, n_features=cfg.n_features, l2=cfg.l2, l1=cfg.l1)
    if len(keep) == 0:
        return [], torch.zeros(0)
    wk, _ = fit_probe(pos[:, keep], neg[:, keep], l2=cfg.l2)
    return keep.tolist(), wk


def leave_one_source_out(
    pooled: torch.Tensor,
    union: Sequence[int],
    positives: Mapping[str, Mapping[str, Sequence[int]]],
    negatives: Sequence[int],
    benign_val: Sequence[int],
    candidates: Callable[[str, str, int], list[int]],
    configs: Sequence[DetectConfig],
    *,
    held_out_rows: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    fpr: float = 0.02,
    progress: bool = False,
    last: torch.Tensor | None = None,
) -> Generalization:
    """Score every configuration by its worst held-out family.

    ``pooled`` (rows, len(union)): pooled candidate features of every prompt, columns in ``union`` order.
    ``positives[c][fam]``: rows of category c's training prompts from family ``fam`` (jailbreak-wrapped ones
    included; families with no rows are fine). ``negatives``: rows of the harmless training prompts.
    ``benign_val``: rows of validation benign prompts (thresholds only). ``candidates(c, held_out, k)``: the
    top ``k`` features of c ranked without the held-out family (feature ids, a subset of ``union``).
    ``held_out_rows[fam][c]``: the rows a held-out family is measured on (default: its ``positives``). ``last`` (rows,
    len(union)): the candidates at each prompt's last user token, needed by ``max+last`` configurations."""
    from tqdm.auto import tqdm

    if last is None and any(c.last for c in configs):
        raise SelectionError("configurations with pool 'max+last' need the last-token features (last=)")
    width = pooled.shape[1]
    if last is not None:
        if last.shape != pooled.shape:
            raise SelectionError(f"last has shape {tuple(last.shape)}, pooled {tuple(pooled.shape)}; they must agree")
        pooled = torch.cat([pooled, last], 1)  # columns of the last-token block follow the pooled ones (DetectConfig.columns)

    fams = sorted({f for by in positives.values() for f, rows in by.items() if rows})
    if len(fams) < 2:
        raise SelectionError(f"leave-one-source-out needs harmful prompts from at least two source families, got {fams}")
    col = {f: i for i, f in enumerate(union)}
    measure = held_out_rows or {f: {c: positives[c].get(f, []) for c in positives} for f in fams}
    neg = pooled[torch.as_tensor(list(negatives), dtype=torch.long)]
    bval = pooled[torch.as_tensor(list(benign_val), dtype=torch.long)]
    families = {f: len({r for c in measure.get(f, {}) for r in measure[f][c]}) for f in fams}
    folds: dict[str, list[FoldResult]] = {}
    cfgs = {c.name: c for c in configs}
    work = [(cfg, f) for cfg in configs for f in fams]
    for cfg, held in tqdm(work, desc="Leave-one-source-out", unit="fold", disable=not progress):
        fired_h: dict[int, bool] = {}
        fired_b = torch.zeros(len(bval), dtype=torch.bool)
        per_cat: dict[str, dict[str, float | int | None]] = {}
        for c, by in positives.items():
            train_rows = [r for f, rows in by.items() if f != held for r in rows]
            test_rows = list(measure.get(held, {}).get(c, []))
            for r in {r for cc in measure.get(held, {}) for r in measure[held][cc]}:
                fired_h.setdefault(r, False)
            if len(train_rows) < 2:
                per_cat[c] = {"n": len(test_rows), "auc": None, "recall": None}
                continue
            feats = [f for f in candidates(c, held, cfg.n_candidates) if f in col]
            if not feats:
                continue
            cols = torch.tensor(cfg.columns([col[f] for f in feats], width))
            pos = pooled[torch.tensor(train_rows)][:, cols]
            keep, w = _fit(pos, neg[:, cols], cfg)
            if not keep:
                continue
            kc = cols[torch.tensor(keep)]
            th = threshold_at(bval[:, kc] @ w, fpr)
            fired_b |= (bval[:, kc] @ w) >= th
            all_rows = sorted(fired_h)
            if all_rows:
                s_all = pooled[torch.tensor(all_rows)][:, kc] @ w
                for r, s in zip(all_rows, s_all.tolist(), strict=True):
                    fired_h[r] = fired_h[r] or s >= th
            if test_rows:
                s = pooled[torch.tensor(test_rows)][:, kc] @ w
                per_cat[c] = {"n": len(test_rows), "auc": round(auc(s, bval[:, kc] @ w), 4), "recall": round(float((s >= th).float().mean()), 4)}
            else:
                per_cat[c] = {"n": 0, "auc": None, "recall": None}
            per_cat[c]["features"] = len({int(k) % width for k in kc})  # distinct SAE features the detector reads
        n = len(fired_h)
        folds.setdefault(cfg.name, []).append(FoldResult(held, n, round(sum(fired_h.values()) / n, 4) if n else 0.0,
                                                         round(float(fired_b.float().mean()), 4), per_cat))
    chosen = max(cfgs, key=lambda k: (min(r.recall_any for r in folds[k]), sum(r.recall_any for r in folds[k])))
    return Generalization(folds, cfgs, chosen, fpr, families)
