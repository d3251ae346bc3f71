"""Running statistics of activations per group, in O(d x groups) memory, and the contrastive scores read from them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


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

