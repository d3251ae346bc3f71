"""Leave-one-source-out comparison of richer detectors on the embedded model (issue 9, part 1).

Runs ``safeguard select``'s own detection stages (``prepare``, ``prompt_statistics``, ``fit_detectors``) with the shipped
configurations (``DETECT_CONFIGS``) and the new ones: sparse (L1) probes over more candidates, and probes on pooled plus
last-user-token features. Every other setting is select's default, as ``scripts/make_policies.sh`` runs it (its flags
change steering, not detection), so the prompt statistics come from the same cache. Only select- and validation-part
prompts are read; no evaluation set.

``--layers 10 20`` also measures detectors on the layer-20 SAE's features and on both layers together (candidates ranked
per layer as select ranks layer 10's, without the held-out family). The engine scores a category at one layer, so those
are a measurement only, not something a pack can ship yet.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/compare_detectors.py --out docs/eval/detectors [--layers 10 20]

Writes ``loso.json`` (every configuration's folds, per category AUC, recall and feature count), ``loso.md`` (the tables)
and ``loso.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from safeguard.lab.selection import DETECT_CONFIGS, DetectConfig, SelectConfig
from safeguard.lab.selection.generalize import Generalization, leave_one_source_out

NEW_CONFIGS = (
    DetectConfig(128, 64, 1.0, l1=0.01),
    DetectConfig(256, 96, 1.0, l1=0.01),
    DetectConfig(256, 96, 1.0, l1=0.03),
    DetectConfig(64, 48, 1.0, pool="max+last"),
    DetectConfig(64, 96, 1.0, pool="max+last"),
    DetectConfig(128, 96, 1.0, l1=0.01, pool="max+last"),
    DetectConfig(256, 128, 1.0, l1=0.01, pool="max+last"),
)
"""The configurations this comparison adds to the shipped ones."""

SHIPPED = "top64->48, l2=1"

LAYER2_CONFIGS = (
    DetectConfig(64, 48, 1.0),
    DetectConfig(64, 48, 1.0, pool="max+last"),
    DetectConfig(128, 96, 1.0, l1=0.01),
)
"""Configurations measured at the second layer alone and at both layers (``--layers``)."""

FPR_CONFIGS = (
    DetectConfig(64, 48, 1.0),
    DetectConfig(128, 64, 1.0, l1=0.01),
    DetectConfig(256, 96, 1.0, l1=0.03),
    DetectConfig(128, 96, 1.0, l1=0.01, pool="max+last"),
)
"""Configurations compared at other LOSO false-positive rates (``--fprs``)."""

OFFSET = 100_000
"""Second-layer feature ids in the joint column space: ``OFFSET + feature``."""


def _render(gen: Generalization, title: str, *, shipped: bool = True) -> str:
    names = list(gen.folds)
    fams = [r.held_out for r in gen.folds[names[0]]]
    lines = [f"## {title}", "", f"Thresholds at {gen.fpr:.0%} of validation benign prompts per category; recall: share of the held-out family's "
             "harmful prompts firing any category; features: mean distinct SAE features per detector over the folds.", "",
             "| configuration | " + " | ".join(f"{f} (n={gen.families[f]})" for f in fams) + " | worst | mean | benign any | features |",
             "|---|" + "---|" * (len(fams) + 4)]
    for k in names:
        rs = {r.held_out: r for r in gen.folds[k]}
        feats = [pc["features"] for r in gen.folds[k] for pc in r.per_category.values() if pc.get("features") is not None]
        mark = " (shipped)" if shipped and k == SHIPPED else ""
        lines.append(f"| {k}{mark} | " + " | ".join(f"{rs[f].recall_any:.1%}" for f in fams)
                     + f" | **{gen.worst(k):.1%}** | {gen.mean(k):.1%} | {max(r.benign_any for r in gen.folds[k]):.1%} | "
                     + (f"{sum(feats) / len(feats):.1f}" if feats else "-") + " |")
    for k in names:
        rs = {r.held_out: r for r in gen.folds[k]}
        cats = sorted({c for r in gen.folds[k] for c in r.per_category})
        lines += ["", f"### {k}: per category, AUC / recall at {gen.fpr:.0%} benign, per held-out family", "",
                  "| category | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
        for c in cats:
            cells = []
            for f in fams:
                pc = rs[f].per_category.get(c)
                cells.append("-" if not pc or not pc["n"] or pc["auc"] is None else f"{pc['auc']:.2f} / {pc['recall']:.0%} (n={pc['n']})")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _texts(prep) -> list:
    """Every prompt ``fit_detectors`` pools, in its order: select-part positives (jailbreak-wrapped too), negatives, then
    the validation prompts (``Detectors.texts``, without needing the prompt statistics)."""
    from safeguard.lab.selection.data import HARMLESS_GROUPS, WRAPPED

    groups, wrapped = prep.groups, prep.wrapped
    pos = [t for c in prep.cats for fam in prep.fams_of[c] for g in (f"{c}|{fam}", f"{c}|{fam}{WRAPPED}") for t in groups.get(g, wrapped.get(g, []))]
    neg = list(dict.fromkeys([p.text for p in prep.data.harmless_select] + [t for g in HARMLESS_GROUPS for t in wrapped.get(f"{g}{WRAPPED}", [])]))
    return list(dict.fromkeys(pos + neg + [p.text for p in prep.val_harmful] + [p.text for p in prep.data.harmless_val]))


def _pool_layer(llm, cfg, prep, layer: int, progress: bool):
    """Every prompt of ``_texts`` pooled (max and last token) over all of ``layer``'s SAE features; cached."""
    from safeguard.lab.selection.data import _cached
    from safeguard.lab.selection.detection import pooled_features

    texts = _texts(prep)
    d_sae = llm.saes[layer].d_sae
    pooled, last = _cached(prep.at("pooledlast-all", prep.model_name, prep.sae_key, texts, layer, cfg.detect_reduce),
                           lambda: pooled_features(llm, texts, list(range(d_sae)), layer=layer, reduce=cfg.detect_reduce, progress=progress,
                                                   desc=f"Pooling every layer-{layer} feature", last=True))
    return texts, pooled, last


def _second_layer(llm, cfg, prep, det, layer: int, progress: bool):
    """The LOSO inputs of a second layer: every text of ``det`` pooled (max and last token) over all of the layer's SAE
    features (rows in ``det.texts`` order), candidates ranked per category without each family as select ranks the
    detect layer's."""
    from safeguard.lab.selection.data import HARMLESS_GROUPS, WRAPPED
    from safeguard.lab.selection.stats import RunningStats, contrast_scores

    d_sae = llm.saes[layer].d_sae
    texts, pooled, last = _pool_layer(llm, cfg, prep, layer, progress)
    at = {t: i for i, t in enumerate(texts)}
    order = torch.tensor([at[t] for t in det.texts])
    pooled, last = pooled[order], last[order]
    index = det.index
    groups = {**prep.groups, **prep.wrapped}
    stats = RunningStats(d_sae, [g for g in groups if groups[g]])
    for g in stats.groups:
        stats.update(g, pooled[torch.tensor([index[t] for t in groups[g]])])
    have = set(stats.groups)
    harmless = stats.summary([g for n in HARMLESS_GROUPS for g in (n, f"{n}{WRAPPED}") if g in have])
    fams = sorted({f for fs in prep.fams_of.values() for f in fs})
    kmax = max(c.n_candidates for c in LAYER2_CONFIGS)
    ranked = {}
    for c in prep.cats:
        for without in [None, *fams]:
            gs = [g for fam in prep.fams_of[c] if fam != without for g in (f"{c}|{fam}", f"{c}|{fam}{WRAPPED}") if g in have]
            sc = contrast_scores(stats.summary(gs), harmless)["composite"] if gs else torch.zeros(d_sae)
            ranked[(c, without)] = [f for f in torch.argsort(sc, descending=True)[:kmax].tolist() if float(sc[f]) > 0]
    return pooled, last, ranked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/eval/detectors"))
    ap.add_argument("--layers", type=int, nargs="+", default=[10], help="the detect layer, then optionally a second one measured alone and jointly")
    ap.add_argument("--sae", nargs="+", default=None, help="SAE folders (default: the bundled ones). Selection's cache keys name the SAE "
                    "folder, so pointing at another checkout's identical bundled SAEs reuses the caches its select warmed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fprs", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.05],
                    help="LOSO false-positive rates to also compare FPR_CONFIGS at (the detect layer only)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--pool-only", action="store_true", help="only pool the second layer's features (cached) and stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safeguard.lab.selection.stages import fit_detectors, prepare, prompt_statistics
    from safeguard.runtime.llm import SteeredLLM

    t0 = time.time()
    progress = not args.quiet
    llm = SteeredLLM.from_pretrained(None, sae=args.sae, policy=None)
    cfg = SelectConfig(detect_layer=args.layers[0], detect_configs=DETECT_CONFIGS + NEW_CONFIGS)
    prep = prepare(llm, cfg)
    if args.pool_only:
        _pool_layer(llm, cfg, prep, args.layers[1], progress)
        print(f"pooled layer {args.layers[1]} after {time.time() - t0:.0f} s", file=sys.stderr)
        return 0
    stats = prompt_statistics(llm, cfg, prep, progress=progress)
    print(f"prompt statistics ready after {time.time() - t0:.0f} s", file=sys.stderr)
    det = fit_detectors(llm, cfg, prep, stats, progress=progress)
    gen = det.generalization
    assert gen is not None
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": "PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/compare_detectors.py " + " ".join(sys.argv[1:]),
               "model": llm.model_name, "detect_layer": cfg.detect_layer, "union": len(det.union), "texts": len(det.texts),
               "layer": gen.to_json()}
    md = [f"# Leave-one-source-out: richer detectors on {llm.model_name}", "",
          f"Written by `{results['command']}` ({time.strftime('%Y-%m-%d')}). Select- and validation-part prompts only.", "",
          _render(gen, f"Layer {cfg.detect_layer} ({len(det.union)} candidate features pooled over {len(det.texts)} prompts)")]
    print(f"layer {cfg.detect_layer} done after {time.time() - t0:.0f} s", file=sys.stderr)
    gen.plot(args.out / "loso.png")

    # the LOSO inputs fit_detectors built (positives, negatives, measured rows), for the runs below
    from safeguard.lab.selection.data import WRAPPED
    from safeguard.lab.selection.generalize import family

    index = det.index
    groups, wrapped = prep.groups, prep.wrapped
    have = set(stats.detect.groups)
    positives = {c: {fam: [index[t] for g in (f"{c}|{fam}", f"{c}|{fam}{WRAPPED}") if g in have for t in groups.get(g, wrapped.get(g, []))]
                     for fam in prep.fams_of[c]} for c in prep.cats}
    measured: dict[str, dict[str, list[int]]] = {}
    for c in prep.cats:
        for fam in prep.fams_of[c]:
            measured.setdefault(fam, {})[c] = [index[t] for t in groups[f"{c}|{fam}"]]
    for p in prep.val_harmful:
        measured.setdefault(family(p.source), {}).setdefault(p.category, []).append(index[p.text])
    neg = det.rows_of(det.neg_texts).tolist()
    bval = [index[p.text] for p in prep.data.harmless_val]

    rates = {}
    for fpr in args.fprs:
        g = leave_one_source_out(det.pooled, det.union, positives, neg, bval, det.candidates, FPR_CONFIGS, held_out_rows=measured, fpr=fpr,
                                 progress=False, last=det.last)
        if abs(fpr - cfg.loso_fpr) < 1e-12:  # the same inputs as select's own run: the same numbers
            assert all(g.folds[k] == gen.folds[k] for k in g.folds), "the rebuilt LOSO inputs differ from fit_detectors'"
        rates[fpr] = g
    if rates:
        fams = [r.held_out for r in gen.folds[SHIPPED]]
        md += [f"## Other false-positive rates (layer {cfg.detect_layer})", "",
               "The same folds with thresholds letting another share of the validation benign prompts fire per category.", "",
               "| configuration | rate | " + " | ".join(fams) + " | worst | mean | benign any |", "|---|---|" + "---|" * (len(fams) + 3)]
        for k in (c.name for c in FPR_CONFIGS):
            for fpr, g in rates.items():
                rs = {r.held_out: r for r in g.folds[k]}
                md.append(f"| {k} | {fpr:.0%} | " + " | ".join(f"{rs[f].recall_any:.1%}" for f in fams)
                          + f" | **{g.worst(k):.1%}** | {g.mean(k):.1%} | {max(r.benign_any for r in g.folds[k]):.1%} |")
        md.append("")
        results["other_rates"] = {str(f): g.to_json() for f, g in rates.items()}
        print(f"other rates done after {time.time() - t0:.0f} s", file=sys.stderr)

    if len(args.layers) > 1:
        layer2 = args.layers[1]
        pooled2, last2, ranked2 = _second_layer(llm, cfg, prep, det, layer2, progress)
        assert det.last is not None
        cols2 = sorted({f for v in ranked2.values() for f in v})
        union = list(det.union) + [OFFSET + f for f in cols2]
        pooled = torch.cat([det.pooled, pooled2[:, cols2]], 1)
        last = torch.cat([det.last, last2[:, cols2]], 1)
        runs = {}
        for name, cand in (
            (f"layer {layer2} alone", lambda c, w, k: [OFFSET + f for f in ranked2[(c, w)][:k]]),
            (f"layers {cfg.detect_layer} and {layer2}", lambda c, w, k: det.ranked[(c, w)][:k] + [OFFSET + f for f in ranked2[(c, w)][:k]]),
        ):
            g2 = leave_one_source_out(pooled, union, positives, neg, bval, cand, LAYER2_CONFIGS, held_out_rows=measured, fpr=cfg.loso_fpr,
                                      progress=progress, last=last)
            runs[name] = g2.to_json()
            md.append(_render(g2, f"{name.capitalize()} (top k candidates from each layer; a measurement only: the engine scores a "
                                  "category at one layer)", shipped=False))
            print(f"{name} done after {time.time() - t0:.0f} s", file=sys.stderr)
        results["second_layer"] = runs
    (args.out / "loso.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "loso.md").write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {args.out}/loso.{{json,md,png}} after {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
