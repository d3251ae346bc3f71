"""``select``'s response stages: ``refusal_features``, ``reply_thresholds``, ``redirect_vectors``, the strength ``sweep``.

Like ``stages``, each is a function of the stages before it with a frozen dataclass (or plain) result; the model runs
in every one but ``redirect_vectors``, its costly passes cached under ``Prepared.at``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .activations import PromptStats, ReplyStats, collect_reply_stats, compliance_replies
from .config import SelectConfig
from .data import HARMLESS_GROUPS, Chat, _cached, _cap, model_input
from .replies import ReplyCalibration, calibrate_reply_thresholds, reply_scores
from .stages import Detectors, Levels, Prepared
from .stats import contrast_scores, distinct_features
from .sweep import SweepPoint, causal_check, pick_strength, strength_sweep
from .tables import FeatureRow, _rows
from .writing import DENSE_KEY, detect_block, label, refusal_section


@dataclass(frozen=True)
class Refusal:
    """The refusal features ``refusal_features`` chose at the steer layer, and the contrast that ranked them."""

    prompts: list[str]
    """Select-part harmful prompts of the refusal/compliance pairs."""
    replies: list[str]
    """The unsteered model's own greedy replies to ``prompts``."""
    pairs: list[tuple[str, str, str]]
    """(prompt, prefilled refusal, compliance): the model's reply, or a compliant opener where it refused or said nothing."""
    candidates: list[int]
    """Distinct candidates the causal check tried."""
    cos: torch.Tensor
    """Each SAE feature's decoder row's cosine with the dense refusal direction."""
    composite: torch.Tensor
    """Each SAE feature's composite score, refusal vs compliance."""
    causal: dict[int, dict[str, Any]]
    """Candidate -> the causal check's result (refusal rate moved, degenerate share, an example)."""
    causal_prompts: list[str]
    features: list[int]
    """The chosen features, best first."""
    weights: torch.Tensor
    """Their weights: the summed direction has unit norm at strength 1."""
    residual_norm: float
    """The unit of strengths: the mean steer-layer residual norm on user tokens."""
    rows: list[FeatureRow]
    """The feature table's refusal rows."""
    direction: torch.Tensor
    """The dense refusal direction (refusal minus compliance reply tokens' mean residual), unit norm."""


def _pick(options: Sequence[str], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def refusal_features(llm: Any, config: SelectConfig, prep: Prepared, stats: PromptStats, *, progress: bool = True) -> Refusal:
    """Refusal vs compliance replies (prefilled) at the steer layer: candidates by composite score and cosine with the
    dense refusal direction, distinct decoder rows, then a causal check (each alone on a few train prompts: do refusals
    move?) picks the features and their weights. Reply statistics and the causal check are cached."""
    from ..refusal import is_refusal
    from ..training import COMPLIANT_OPENERS, REFUSALS

    c = config
    st_sae = llm.saes[c.steer_layer]
    plain_select = prep.plain_harmful
    pair_prompts = [p.text for p in _cap([p for p in plain_select if p.category in prep.by_cat], c.n_refusal_pairs, c.seed + 7)]
    replies = compliance_replies(llm, pair_prompts, progress=progress)
    pairs = [(p, _pick(REFUSALS, p), r if r.strip() and not is_refusal(r) else _pick(COMPLIANT_OPENERS, p))
             for p, r in zip(pair_prompts, replies, strict=True)]
    rstats: ReplyStats = _cached(prep.at("replies", prep.model_name, prep.sae_key, pairs, c.steer_layer),
                                 lambda: collect_reply_stats(llm, pairs, layer=c.steer_layer, progress=progress))
    ref_t, ref_c = rstats.sae.summary("refusal"), rstats.sae.summary("compliance")
    rsc = contrast_scores(ref_t, ref_c)
    dense = rstats.refusal_direction()
    dec = st_sae.decoder_rows(range(st_sae.d_sae))
    cos = (dec @ dense) / (dec.norm(dim=-1) * dense.norm() + 1e-12)
    comp = rsc["composite"].float()
    steer_score = comp / (comp.max() + 1e-12) + cos.clamp(min=0)
    pool = torch.argsort(comp, descending=True)[:64].tolist()
    pool.sort(key=lambda f: -float(steer_score[f]))
    candidates = distinct_features(pool, dec, k=c.n_candidates, max_cos=c.max_decoder_cos)
    norm = stats.resid_norm
    causal_prompts = [p.text for p in _cap(plain_select, c.n_causal_prompts, c.seed + 11)]
    causal = _cached(prep.at("causal", prep.model_name, prep.sae_key, candidates, causal_prompts, c.causal_strength, c.positions, round(norm, 4)),
                     lambda: causal_check(llm, candidates, causal_prompts, steer_layer=c.steer_layer, detect_layer=c.detect_layer,
                                          strength=c.causal_strength * norm, positions=c.positions, progress=progress))
    ranked = sorted(candidates, key=lambda f: (-causal[f]["refusal"], -float(steer_score[f])))
    steer_feats = [f for f in ranked if causal[f]["refusal"] > 0][:c.n_steer_features] or ranked[:1]
    w = torch.tensor([max(causal[f]["refusal"], 1e-3) for f in steer_feats])
    units = dec[steer_feats] / dec[steer_feats].norm(dim=-1, keepdim=True)
    w = w / (w[:, None] * units).sum(0).norm()  # the summed direction has unit norm at strength 1
    extra = {f: {"cos_refusal": round(float(cos[f]), 4), "causal_refusal": causal[f]["refusal"] if f in causal else None,
                 "causal_degenerate": causal[f]["degenerate"] if f in causal else None} for f in pool}
    rows = _rows("refusal", "refusal", c.steer_layer, rsc, ref_t, ref_c, pool[:max(10, c.n_candidates)], steer_feats, extra)
    return Refusal(pair_prompts, replies, pairs, candidates, cos, comp, causal, causal_prompts, steer_feats, w, norm, rows,
                   (dense / (dense.norm() + 1e-12)).float().contiguous())


def reply_thresholds(llm: Any, config: SelectConfig, prep: Prepared, det: Detectors, refusal: Refusal, *,
                     progress: bool = True) -> ReplyCalibration | None:
    """Detection while the reply is written: per category, a threshold on the unsteered model's own replies (``replies``);
    None when ``reply_detection`` is off. The reply scores are cached."""
    from ..refusal import is_refusal

    c = config
    if not c.reply_detection:
        return None
    data, cats = prep.data, prep.cats
    cat_of = {p.text: p.category for p in prep.plain_harmful}
    own = [(p, r) for p, r in zip(refusal.prompts, refusal.replies, strict=True) if r.strip() and not is_refusal(r)]
    b_prompts = [p.text for p in _cap([p for p in data.harmless_select if not isinstance(p.text, Chat)], c.n_reply_benign, c.seed + 19)]
    vb_prompts = [p.text for p in data.harmless_val if not isinstance(p.text, Chat)]
    b_replies = compliance_replies(llm, b_prompts + vb_prompts, progress=progress)
    detectors = [d for d in det.detectors if d.last_weights is None]  # a reply has no last user token: those decide at the prompt
    cats = [d.category for d in detectors]
    if not detectors:
        return None
    rs = _cached(prep.at("replyscores", prep.model_name, prep.sae_key, [d.key() for d in detectors], own, b_prompts, vb_prompts, b_replies,
                         c.detect_layer),
                 lambda: reply_scores(llm, own + list(zip(b_prompts + vb_prompts, b_replies, strict=True)), detectors, layer=c.detect_layer,
                                      progress=progress))
    no, nb = len(own), len(b_prompts)
    return calibrate_reply_thresholds(
        {k: rs[k][no:no + nb] for k in cats},
        {k: rs[k][:no][torch.tensor([cat_of.get(p) == k for p, _ in own], dtype=torch.bool)] for k in cats},
        margin=c.reply_margin, val_benign={k: rs[k][no + nb:] for k in cats})


def redirect_vectors(prep: Prepared, stats: PromptStats) -> dict[str, torch.Tensor]:
    """SafeSteer-style redirect vectors for every category: harmless mean minus the category's mean residual at the steer layer."""
    safe_mean = stats.resid.summary(list(HARMLESS_GROUPS)).mean.float()
    return {c: (safe_mean - stats.resid.summary([f"{c}|{fam}" for fam in prep.fams_of[c]]).mean.float()).contiguous() for c in prep.cats}


@dataclass(frozen=True)
class Sweep:
    """The strength sweep on the validation part (``sweep``)."""

    points: list[SweepPoint]
    baseline: dict[str, float]
    """The unsteered model's refusal rates on the same prompts."""
    chosen: SweepPoint
    n_harmful: int
    """Validation harmful prompts swept."""
    n_benign: int


def sweep(llm: Any, config: SelectConfig, prep: Prepared, det: Detectors, levels: Levels, refusal: Refusal, *, progress: bool = True) -> Sweep:
    """Steer every category at its ``standard`` threshold through the real engine at each strength (or ``strength``
    alone) on validation prompts; pick the strength by ``sweep_objective`` within the benign budget."""
    c = config
    val_h_sweep = [model_input(p.text) for p in _cap(prep.val_harmful, c.n_val_harmful, c.seed + 3)]
    val_b_sweep = [model_input(p.text) for p in _cap(prep.data.harmless_val, c.n_val_benign, c.seed + 5)]

    # each strength runs through a temporary pack, so the sweep measures what the pack will do: its refusal
    # actions at that strength, its opener, every category refused at its standard threshold (no reply watching)
    import tempfile

    import yaml
    from safetensors.torch import save_file

    from ...runtime.llm import SteeredLLM
    from ...runtime.policy import Policy
    from ..datasets import TAXONOMY_NAME, TAXONOMY_VERSION

    policy = Policy.from_dict({"schema_version": 2, "name": f"{prep.pack_id}-sweep", "version": "1",
                               "taxonomy": {"name": TAXONOMY_NAME, "version": TAXONOMY_VERSION},
                               "defaults": {"response": "refuse", "sensitivity": "standard", "watch_reply": False},
                               "categories": {d.category: {} for d in det.detectors}})

    def make(s: float) -> Any:
        pack = {"schema_version": 1, "id": prep.pack_id, "model": llm.model_name, "sae": prep.release,
                "taxonomy": {"name": TAXONOMY_NAME, "version": TAXONOMY_VERSION}, "measured": False,
                "levels": {lv: {"max_false_positive_rate": 0.0} for lv in ("relaxed", "standard", "strict")},
                "refusal": refusal_section(c, refusal, s),
                "categories": {d.category: {"label": label(d.category), "detect": detect_block(c, d),
                                            "levels": {lv: {"threshold": levels.thresholds[d.category]} for lv in ("relaxed", "standard", "strict")}}
                               for d in det.detectors}}
        folder = Path(tmp) / f"s{s:g}"
        folder.mkdir(exist_ok=True)
        if c.refusal_style == "dense":
            save_file({DENSE_KEY: refusal.direction}, str(folder / "pack.vectors.safetensors"))
        (folder / "pack.yaml").write_text(yaml.safe_dump(pack, sort_keys=False))
        return SteeredLLM(llm._loaded, llm.saes, None, pack=folder / "pack.yaml"), policy

    grid = [c.strength] if c.strength is not None else list(c.strengths)
    with tempfile.TemporaryDirectory(prefix="safeguard-sweep-") as tmp:  # the temporary packs go with it
        points, baseline = strength_sweep(llm, make, val_h_sweep, val_b_sweep, grid, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                                          progress=progress)
    chosen = pick_strength(points, baseline["benign_refusal"], max_benign_increase=c.max_benign_increase, objective=c.sweep_objective)
    return Sweep(points, baseline, chosen, len(val_h_sweep), len(val_b_sweep))

