"""``SelectConfig``: every setting of ``select``, checked before any model runs."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import SelectionError
from .calibration import CURVE_TARGETS, RELAX_MARGIN, STRICT_FPR
from .generalize import DetectConfig

POSITIONS = ("prompt", "generated", "both")
REFUSAL_STYLES = ("features", "dense")
"""How a pack may refuse (``SelectConfig.refusal_style``)."""

DETECT_CONFIGS = (
    DetectConfig(16, 12, 1e-2),
    DetectConfig(32, 12, 1e-2),
    DetectConfig(32, 24, 1e-2),
    DetectConfig(32, 24, 1e-1),
    DetectConfig(64, 32, 1e-1),
    DetectConfig(64, 48, 1.0),
)
"""The detector configurations leave-one-source-out validation chooses among (``generalize``)."""


@dataclass(frozen=True)
class SelectConfig:
    """Every setting of ``select`` (see its docstring and the package docstring). Sequences are kept as tuples."""

    categories: Sequence[str] | None = None
    """The categories the pack detects (default: every harm category with at least ``min_prompts`` select-part prompts)."""
    pack_id: str | None = None
    """The pack's id, a slug (default: the SAE release)."""
    description: str = ""
    """The pack's description (default: one naming its categories and layers)."""
    detect_layer: int = 10
    """The layer whose SAE features detect categories."""
    steer_layer: int = 20
    """The layer whose SAE features steer refusals, and where redirect vectors are added."""
    n_detect_features: int | None = None
    """Fix the features kept per detector (with ``n_detect_candidates``: one configuration, no leave-one-source-out choice)."""
    n_detect_candidates: int | None = None
    """Fix the candidate features per detector (see ``n_detect_features``)."""
    detect_l2: float | None = None
    """Fix the probes' L2 penalty (see ``n_detect_features``; default with them: 0.01)."""
    detect_configs: Sequence[DetectConfig] = DETECT_CONFIGS
    """The detector configurations leave-one-source-out validation chooses among."""
    loso_fpr: float = 0.02
    """Leave-one-source-out thresholds: this false-positive rate on the validation benign prompts."""
    n_steer_features: int = 3
    """Refusal features the pack steers with."""
    n_candidates: int = 8
    """Refusal candidates that the causal check tries."""
    max_decoder_cos: float = 0.7
    """Refusal candidates' decoder rows have at most this cosine with each other."""
    min_prompts: int = 10
    """Default categories: those with at least this many select-part prompts."""
    max_per_category: int = 80
    """Select-part prompts per category and source family in the statistics (sampled by seed)."""
    n_refusal_pairs: int = 160
    """Harmful prompts with a prefilled refusal and a compliant reply, for refusal features."""
    n_causal_prompts: int = 12
    """Prompts the causal check steers each refusal candidate on."""
    causal_strength: float = 1.0
    """The causal check's strength, in units of the steer-layer residual norm."""
    positions: str = "prompt"
    """Where the refusal steering applies: ``prompt``, ``generated`` or ``both``."""
    refusal_style: str = "features"
    """How the pack refuses: ``features`` (the chosen SAE refusal features' decoder directions, added) or ``dense`` (the
    dense refusal direction: mean steer-layer residual on refusal minus compliance reply tokens, in the vectors file)."""
    opener: str | None = None
    """A refusal opener forced as the first tokens of refusing rows (``runtime/openers.py``); ``None``: none."""
    after_opener: str = "steer"
    """What follows the opener in the pack's refusals: ``steer`` (the model goes on, steered) or ``end`` (the reply
    is the opener alone; the refusal steering then acts only where a category fires in the reply)."""
    strengths: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5)
    """The strength sweep's grid, in units of the steer-layer residual norm."""
    strength: float | None = None
    """Skip the sweep and use this strength."""
    n_val_harmful: int = 32
    """Validation harmful prompts in the strength sweep."""
    n_val_benign: int = 32
    """Validation benign prompts in the strength sweep."""
    threshold_margin: float | None = None
    """Fix the ``standard`` margin instead of choosing it per category on the validation part."""
    max_val_fpr: float = 0.02
    """Margins fall while at most this share of validation benign prompts fires any category."""
    min_margin: float = 0.0
    """The lowest margin the per-category choice tries (the grid runs from 1.5 down to -1.0 in steps of 0.1; a negative
    margin puts the threshold below the highest calibration benign score)."""
    relax_margin: float = RELAX_MARGIN
    """The ``relaxed`` level's margin on top of the ``standard`` one."""
    strict_fpr: float = STRICT_FPR
    """The ``strict`` level's false-positive rate on the calibration benign scores."""
    curve_targets: Sequence[float] = CURVE_TARGETS
    """The false-positive rates of each category's curve of thresholds."""
    sweep_objective: str = "acceptable"
    """What the sweep maximises within the benign budget: ``acceptable`` refusals (the audit proxy's coherent refusals
    that fit the request, then any refusal) or ``refusal`` (any refusal phrase)."""
    max_benign_increase: float = 0.04
    """The sweep's chosen strength raises benign refusals by at most this much."""
    redirect_strength: float = 1.0
    """The strength of the redirect vectors, written in the pack."""
    reply_detection: bool = True
    """Calibrate thresholds for detection while the reply is written."""
    n_reply_benign: int = 160
    """Select-part harmless prompts whose unsteered replies place the reply thresholds."""
    reply_margin: float = 0.2
    """Reply thresholds sit this share of the gap above the highest benign reply score."""
    detect_reduce: str = "max"
    """How detection pools feature activations over the user's tokens: ``max`` or ``mean``."""
    detect_window: int | None = None
    """Detection reads only the last this many user tokens (``Detect.window``: the end of a message, where a jailbreak
    template puts the request it wraps); ``None``: every user token."""
    shared_harm: float = 0.0
    """> 0: every category's detector adds a shared any-harm probe (every category's positives against the harmless
    prompts), scaled to this share of the category score's spread on the harmless prompts (``stages.shared_probe``); 0: none."""
    shared_features: int = 256
    """Features the shared any-harm probe keeps (of every category's candidates)."""
    shared_l2: float = 0.1
    """The shared probe's L2 penalty (on standardised inputs)."""
    shared_wrapped: bool = False
    """Fit the shared probe on the jailbreak-wrapped positives too (default: plain ones only; wrapped ones are scored)."""
    styles: bool = False
    """Add the selection-only sets ``harmful_styles.jsonl`` (harmful requests in seven wordings, a source family of its own)
    and ``risky_benign_more.jsonl`` to selection's data (``selection_data(styles=True)``). Off by default: a pack selected
    with them was worse on the held-out frontier (docs/eval/ceiling.md)."""
    n_wrapped_harmful: int = 200
    """Select-part harmful prompts wrapped in the train jailbreak templates (detection positives)."""
    n_wrapped_harmless: int | None = None
    """Select-part harmless prompts wrapped likewise (default: at the harmful ones' rate)."""
    seed: int = 0
    """Seeds the data split, every sample of prompts and the probes' folds."""
    tables: str | Path | None = None
    """The folder of the feature tables and plots (default: ``selection/`` beside the pack)."""
    max_new_tokens: int = 48
    """Tokens generated per prompt in the strength sweep."""
    batch_size: int = 8
    """Prompts per batch in the strength sweep."""

    def __post_init__(self) -> None:
        for name in ("categories", "detect_configs", "strengths", "curve_targets"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.detect_reduce not in ("max", "mean"):
            raise SelectionError(f"detect_reduce must be 'max' or 'mean', not {self.detect_reduce!r}")
        if self.detect_window is not None and (isinstance(self.detect_window, bool) or not isinstance(self.detect_window, int) or self.detect_window < 1):
            raise SelectionError(f"detect_window must be a positive whole number of tokens or None, not {self.detect_window!r}")
        if not self.shared_harm >= 0 or not self.shared_l2 >= 0 or isinstance(self.shared_features, bool) or not isinstance(self.shared_features, int) \
                or self.shared_features < 1:
            raise SelectionError(f"shared_harm and shared_l2 must be >= 0 and shared_features a positive whole number, got {self.shared_harm!r}, "
                                 f"{self.shared_l2!r} and {self.shared_features!r}")
        if self.shared_harm > 0 and any(d.last for d in self.detector_configs):
            raise SelectionError("shared_harm: a shared any-harm probe reads pooled features only; it cannot join detector configurations that "
                                 "read the last user token (pool 'max+last')")
        if self.positions not in POSITIONS:
            raise SelectionError(f"positions must be one of {list(POSITIONS)}, not {self.positions!r}")
        if self.sweep_objective not in ("acceptable", "refusal"):
            raise SelectionError(f"sweep_objective must be 'acceptable' or 'refusal', not {self.sweep_objective!r}")
        if self.refusal_style not in REFUSAL_STYLES:
            raise SelectionError(f"refusal_style must be one of {list(REFUSAL_STYLES)}, not {self.refusal_style!r}")
        if self.opener is not None:
            from ...runtime.openers import check_opener

            try:
                check_opener(self.opener)
            except ValueError as exc:
                raise SelectionError(f"opener: {exc}") from None
        if self.after_opener not in ("steer", "end"):
            raise SelectionError(f"after_opener must be 'steer' or 'end', not {self.after_opener!r}")
        if self.after_opener == "end" and self.opener is None:
            raise SelectionError("after_opener 'end' needs an opener (the refusal would be empty); give --opener")
        if self.n_wrapped_harmful < 0 or (self.n_wrapped_harmless is not None and self.n_wrapped_harmless < 0):
            raise SelectionError(f"n_wrapped_harmful and n_wrapped_harmless count prompts (>= 0), got {self.n_wrapped_harmful} and "
                                 f"{self.n_wrapped_harmless}")
        if self.relax_margin < 0 or not 0 <= self.strict_fpr < 1 or any(not 0 <= r < 1 for r in self.curve_targets):
            raise SelectionError(f"relax_margin must be >= 0 and strict_fpr and curve_targets rates in [0, 1); got {self.relax_margin}, "
                                 f"{self.strict_fpr}, {list(self.curve_targets)}")
        if self.pack_id is not None:
            check_pack_id(self.pack_id)
        if not self.detector_configs:
            raise SelectionError("detect_configs: give at least one detector configuration")

    @property
    def detector_configs(self) -> list[DetectConfig]:
        """The configurations to choose among: ``detect_configs``, or the one that ``n_detect_*`` fix."""
        if self.n_detect_candidates is not None or self.n_detect_features is not None or self.detect_l2 is not None:  # fixed: no choice
            return [DetectConfig(self.n_detect_candidates or 16, self.n_detect_features or 12, 1e-2 if self.detect_l2 is None else self.detect_l2)]
        return list(self.detect_configs)

    @classmethod
    def settings(cls) -> list[str]:
        """The names of every setting."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, config: SelectConfig | None = None, settings: Mapping[str, Any] | None = None) -> SelectConfig:
        """``config`` (default: the defaults) with ``settings`` replaced; an unknown setting is an error that lists the valid ones."""
        settings = dict(settings or {})
        valid = cls.settings()
        unknown = [k for k in settings if k not in valid]
        if unknown:
            hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise SelectionError(f"select: unknown setting{'s' if len(unknown) > 1 else ''} {said}; valid settings: {', '.join(valid)}")
        if config is None:
            return cls(**settings)
        return dataclasses.replace(config, **settings) if settings else config


def check_pack_id(pack_id: str) -> None:
    """Refuse a pack id that is not a slug."""
    from ...runtime.policy import SLUG

    if not re.match(SLUG, pack_id):
        raise SelectionError(f"pack id {pack_id!r} must be a slug (lower case, digits, '_' or '-'); pass pack_id")
