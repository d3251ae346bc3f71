"""The table of chosen and candidate features (features.csv / features.json) and its text rendering."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .stats import GroupSummary


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

