"""Operating points of a category detector: the thresholds of the named sensitivity levels and of a curve of
false-positive targets, each with what it does on validation prompts (the pack's ``levels`` and ``curve``).

Thresholds are placed on a category's *calibration benign scores*: the out-of-fold scores of the select-part
harmless prompts (``DetectorFit.oof_neg``, jailbreak-wrapped ones included), so no prompt scores a probe that
was fitted on it. They are measured on the validation part, which placed none of them (only the ``standard``
margins were chosen there, as before packs existed):

- ``standard``: ``choose_threshold(oof_pos, oof_neg, margin=m_c)``, with the per-category margin ``m_c`` that
  ``greedy_margins`` chose under the any-category validation budget;
- ``relaxed``: the same rule at margin ``m_c + RELAX_MARGIN`` (less sensitive);
- ``strict``: the lower of ``standard`` and the ``1 - STRICT_FPR`` quantile of the calibration benign scores;
- ``curve``: per target rate r of ``CURVE_TARGETS``, the ``1 - r`` quantile of the calibration benign scores (r = 0:
  just above their maximum).

A prompt fires a category when its score is ``>= threshold``. Thresholds are rounded *up* to 5 decimals, so a
written threshold is never more permissive than the one chosen, and rates are measured at the written value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .detection import choose_threshold

__all__ = ["CURVE_TARGETS", "LEVEL_TARGETS", "RELAX_MARGIN", "STRICT_FPR", "OperatingPoints", "level_descriptions", "measure",
           "operating_points", "pack_levels", "round_up"]

RELAX_MARGIN = 0.5
STRICT_FPR = 0.01
CURVE_TARGETS = (0.0, 0.005, 0.01, 0.02, 0.05)
LEVEL_TARGETS = {"relaxed": 0.0, "standard": 0.0, "strict": STRICT_FPR}
"""The false-positive rate each level aims at on benign prompts (per category)."""


def level_descriptions(*, max_val_fpr: float = 0.02, relax: float = RELAX_MARGIN, strict_fpr: float = STRICT_FPR) -> dict[str, str]:
    """One sentence per level, for the pack's top-level ``levels``."""
    return {
        "relaxed": f"Less sensitive than standard: each threshold a further {relax:g} of the gap from the highest benign calibration score "
                   "to the median harmful one above standard's, for deployments that fear over-refusal more than misses.",
        "standard": "The default: the highest benign calibration score moved by a per-category margin (a share of the gap to the median "
                    f"harmful score; negative: below it), chosen so that at most {max_val_fpr:.0%} of validation benign prompts fire any category.",
        "strict": f"More sensitive: about {strict_fpr:.0%} of benign calibration prompts fire each category (never less sensitive than "
                  "standard).",
    }


def round_up(t: float, digits: int = 5) -> float:
    """``t`` rounded to ``digits`` decimals, never below ``t``."""
    r = round(float(t), digits)
    return r if r >= t else round(r + 10.0 ** -digits, digits)


@dataclass(frozen=True)
class OperatingPoints:
    """One category's thresholds: per level, and per curve target."""

    levels: dict[str, float]
    curve: list[tuple[float, float]]
    """(target false-positive rate, threshold), targets increasing."""


def operating_points(oof_pos: torch.Tensor, oof_neg: torch.Tensor, margin: float, *, relax: float = RELAX_MARGIN, strict_fpr: float = STRICT_FPR,
                     targets: Sequence[float] = CURVE_TARGETS) -> OperatingPoints:
    """The levels and the curve of one category from its out-of-fold scores (see the module docstring)."""
    standard = choose_threshold(oof_pos, oof_neg, margin=margin)
    relaxed = choose_threshold(oof_pos, oof_neg, margin=margin + relax)

    def quantile(rate: float) -> float:
        return choose_threshold(oof_pos, oof_neg, max_fpr=rate, margin=0.0)

    strict = min(standard, quantile(strict_fpr))
    levels = {"relaxed": round_up(relaxed), "standard": round_up(standard), "strict": round_up(strict)}
    return OperatingPoints(levels, [(float(r), round_up(quantile(r))) for r in sorted(targets)])


def measure(threshold: float, benign: torch.Tensor, harmful: torch.Tensor) -> tuple[float | None, float | None]:
    """(fpr, recall): shares of ``benign`` and of ``harmful`` scores at or above ``threshold`` (``None`` for an empty set)."""
    fpr = round(float((benign >= threshold).float().mean()), 4) if benign.numel() else None
    recall = round(float((harmful >= threshold).float().mean()), 4) if harmful.numel() else None
    return fpr, recall


def pack_levels(points: OperatingPoints, benign: torch.Tensor, harmful: torch.Tensor) -> dict[str, object]:
    """A pack category's ``levels`` and ``curve`` entries, each threshold with its measured fpr and recall."""
    levels: Mapping[str, object] = {lv: dict(zip(("threshold", "fpr", "recall"), (t, *measure(t, benign, harmful)), strict=True))
                                    for lv, t in points.levels.items()}
    curve = [{"max_false_positive_rate": r, **dict(zip(("threshold", "fpr", "recall"), (t, *measure(t, benign, harmful)), strict=True))}
             for r, t in points.curve]
    return {"levels": dict(levels), "curve": curve}
