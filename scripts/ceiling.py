"""Is the SAE, the layer, or the data the ceiling of detection on the embedded model? (issue 9, "say what limits it")

The shipped detectors are linear probes on max-pooled features of the project's own layer-10 SAE. Leave-one-source-out
(LOSO) recall has stayed near 45% on the worst held-out family through every detector variant tried
(docs/eval/detectors.md, shared.md). This asks whether a different *representation* would do better, with one probe
recipe for all of them:

- an any-harm logistic probe (``fit_probe``, standardised inputs, L2 ``--l2``): harmful select-part prompts of every
  family but F against every harmless select-part prompt (risky-looking ones and benign conversations included);
- its threshold lets ``--budget`` of the 127 validation benign prompts fire (as ``safeguard select``'s budget);
- recall: the share of family F's harmful prompts (select and validation parts) at or above it.

Representations, all from the same forward passes over the same prompts, read on the tokens the engine reads (the
user's last 64 tokens; a conversation at its last user turn, in context):

- ``sae L10 max`` / ``sae L20 max``: every feature of the bundled SAE at that layer, max over the window (the shipped
  detectors' input, before candidate ranking and feature selection);
- ``resid L mean`` / ``resid L last``: the raw residual stream (the decoder layer's output) at layer L, mean over the
  window, or at the last user token.

A row "in-distribution" repeats every representation with 5 random folds over all families (every family seen in
training), so the gap between it and LOSO is the part of the problem that is transfer, not separability.

Only select- and validation-part prompts are read; no ``safeguard eval`` set and no eval part of the project's data.
Nothing here is shipped or chosen for a pack; it measures where the limit is. Writes ``<out>.json``, ``<out>_table.md`` and
``<out>.png``; about 10 minutes on one thread::

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/ceiling.py --out docs/eval/ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safeguard.lab.recording import encode_prompt, layer_outputs
from safeguard.lab.selection import SelectConfig, prepare
from safeguard.lab.selection.activations import _left_pad_mask, _pool, _token_batches
from safeguard.lab.selection.data import Chat
from safeguard.lab.selection.detection import fit_probe
from safeguard.lab.selection.generalize import auc, family, threshold_at
from safeguard.runtime.llm import SteeredLLM
from safeguard.runtime.steering import last_positions

WINDOW = 64
"""The shipped pack's detection window (scripts/make_policies.sh)."""


def represent(llm, texts: list, layers: list[int], sae_layers: list[int], *, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Every representation of every text: ``resid L mean``, ``resid L last`` for ``layers``, ``sae L max`` for ``sae_layers``."""
    from tqdm.auto import tqdm

    d = llm.model.config.hidden_size
    out = {f"resid {layer} {r}": torch.zeros(len(texts), d) for layer in layers for r in ("mean", "last")}
    for layer in sae_layers:
        out[f"sae {layer} max"] = torch.zeros(len(texts), llm.saes[layer].d_sae)
    items = sorted(((i, encode_prompt(llm, t, window=WINDOW)) for i, t in enumerate(texts)), key=lambda it: len(it[1][0]))
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    every = sorted(set(layers) | set(sae_layers))
    encoders = {layer: llm.saes[layer].encoder(list(range(llm.saes[layer].d_sae))) for layer in sae_layers}
    for batch in tqdm(_token_batches(items, batch_size, 4096), desc="Forward passes", unit="batch"):
        acts, attn = layer_outputs(llm.model, [ids for _, (ids, _) in batch], every, pad_id=pad)
        user = _left_pad_mask([m for _, (_, m) in batch], attn.shape[1])
        rows = torch.tensor([i for i, _ in batch])
        at, row_of = last_positions(user), user.nonzero()[:, 0]
        for layer in layers:
            out[f"resid {layer} mean"][rows] = _pool(acts[layer][user], row_of, len(batch), "mean")
            out[f"resid {layer} last"][rows] = acts[layer][torch.arange(len(batch)), at]
        for layer in sae_layers:
            out[f"sae {layer} max"][rows] = _pool(encoders[layer](acts[layer][user].to(llm.device)).float(), row_of, len(batch), "max")
    return out


def probe_scores(x: torch.Tensor, pos: list[int], neg: list[int], val_b: list[int], *, l2: float, budget: float) -> tuple[torch.Tensor, float]:
    """Every row's score under a probe fitted on rows ``pos`` against ``neg``, and the threshold at which ``budget`` of
    rows ``val_b`` fire."""
    w, b = fit_probe(x[pos], x[neg], l2=l2)
    s = x @ w + b
    return s, threshold_at(s[val_b], budget)


def measure(x: torch.Tensor, pos: list[int], neg: list[int], val_b: list[int], measured: list[int], *, l2: float, budget: float,
            risky: list[int]) -> dict[str, float]:
    s, t = probe_scores(x, pos, neg, val_b, l2=l2, budget=budget)
    return {"recall": round(float((s[measured] >= t).float().mean()), 4), "auc": round(auc(s[measured], s[val_b]), 4),
            "risky_fired": round(float((s[risky] >= t).float().mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/eval/ceiling"))
    ap.add_argument("--budget", type=float, default=0.04, help="share of validation benign prompts allowed to fire (select's --max-val-fpr)")
    ap.add_argument("--l2", type=float, nargs="+", default=[1.0, 10.0], help="the probe's L2 penalties (each one a row)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6, 10, 14, 18, 20, 22, 26, 29])
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    llm = SteeredLLM.from_pretrained(None, policy=None)
    prep = prepare(llm, SelectConfig.of(None, dict(detect_window=WINDOW, styles=True)))  # with harmful_styles and risky_benign_more
    data = prep.data
    harm = [p for p in data.harmful_select if p.category in prep.cats] + prep.val_harmful
    harm_texts = list(dict.fromkeys(p.text for p in harm))
    fam_of = {}
    for p in harm:
        fam_of.setdefault(p.text, family(p.source))
    neg_texts = list(dict.fromkeys(p.text for p in data.harmless_select))
    val_b = data.harmless_val
    texts = list(dict.fromkeys(harm_texts + neg_texts + [p.text for p in val_b]))
    index = {t: i for i, t in enumerate(texts)}
    select_h = {p.text for p in data.harmful_select}
    fams = sorted(set(fam_of.values()))
    neg = [index[t] for t in neg_texts]
    vb = [index[p.text] for p in val_b]
    risky = [index[p.text] for p in val_b if p.category == "benign_risky_looking" and not isinstance(p.text, Chat)]
    print(f"{len(texts)} prompts: {len(harm_texts)} harmful ({', '.join(f'{f} {sum(v == f for v in fam_of.values())}' for f in fams)}), "
          f"{len(neg)} harmless select, {len(vb)} validation benign ({len(risky)} risky-looking)", flush=True)
    reps = represent(llm, texts, args.layers, sorted(llm.saes))
    print(f"represented in {time.time() - start:.0f} s", flush=True)

    gen = torch.Generator().manual_seed(0)
    train_h = [t for t in harm_texts if t in select_h]
    fold_of = {t: int(k) for t, k in zip(train_h, torch.randint(0, 5, (len(train_h),), generator=gen).tolist(), strict=True)}
    results: dict[str, dict] = {}
    for name, x in reps.items():
        for l2 in args.l2:
            key = f"{name}, l2={l2:g}"
            row: dict[str, dict] = {}
            for f in fams:  # leave one source family out
                pos = [index[t] for t in train_h if fam_of[t] != f]
                row[f] = measure(x, pos, neg, vb, [index[t] for t in harm_texts if fam_of[t] == f], l2=l2, budget=args.budget, risky=risky)
            ind = {f: {"hit": 0, "n": 0} for f in fams}  # in-distribution: 5 random folds of the select part, every family seen
            for k in range(5):
                pos = [index[t] for t in train_h if fold_of[t] != k]
                held = [t for t in train_h if fold_of[t] == k]
                s, thr = probe_scores(x, pos, neg, vb, l2=l2, budget=args.budget)
                for t in held:
                    ind[fam_of[t]]["hit"] += int(s[index[t]] >= thr)
                    ind[fam_of[t]]["n"] += 1
            lo = [row[f]["recall"] for f in fams]
            indist = {f: round(v["hit"] / v["n"], 4) for f, v in ind.items() if v["n"]}
            results[key] = {"loso": row, "worst": min(lo), "mean": round(sum(lo) / len(lo), 4), "in_distribution": indist,
                            "in_distribution_worst": min(indist.values()), "dims": x.shape[1]}
            print(f"{key:28s} LOSO worst {min(lo):.3f} mean {sum(lo) / len(lo):.3f} | in-dist worst {min(indist.values()):.3f} | "
                  + " ".join(f"{f} {row[f]['recall']:.2f}/{row[f]['risky_fired']:.2f}" for f in fams), flush=True)
    out = {"command": "PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/ceiling.py --out " + str(args.out), "budget": args.budget,
           "window": WINDOW, "families": fams, "n_harmful": {f: sum(v == f for v in fam_of.values()) for f in fams}, "n_negatives": len(neg),
           "n_validation_benign": len(vb), "n_risky_looking_validation": len(risky), "layers": args.layers, "l2": args.l2,
           "seconds": round(time.time() - start), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_name(f"{args.out.name}_table.md").write_text(render(out))
    plot(out, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}, {args.out.name}_table.md and {args.out.with_suffix('.png')} in {time.time() - start:.0f} s")


def render(out: dict) -> str:
    """The results as markdown: per representation, LOSO recall per held-out family (and the held-out family's AUC
    against the validation benign prompts), then the in-distribution recall per family."""
    fams = out["families"]
    lines = [f"Recall at {out['budget']:.0%} of {out['n_validation_benign']} validation benign prompts firing. LOSO cells: recall / AUC of the "
             f"held-out family against the validation benign prompts. In-distribution: 5 random folds of the select part, every family seen.", "",
             "| representation | dims | " + " | ".join(f"{f} (n={out['n_harmful'][f]})" for f in fams) + " | LOSO worst | LOSO mean | "
             + " | ".join(f"in-dist {f}" for f in fams) + " | in-dist worst |", "|---" * (2 * len(fams) + 5) + "|"]
    for name, r in out["results"].items():
        lines.append(f"| {name} | {r['dims']} | " + " | ".join(f"{r['loso'][f]['recall']:.0%} / {r['loso'][f]['auc']:.2f}" for f in fams)
                     + f" | **{r['worst']:.0%}** | {r['mean']:.0%} | " + " | ".join(f"{r['in_distribution'][f]:.0%}" for f in fams)
                     + f" | {r['in_distribution_worst']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, layers = out["results"], out["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, what, title in ((axes[0], "worst", "worst held-out family (LOSO)"), (axes[1], "in_distribution_worst", "worst family, every family seen")):
        for l2, style in zip(out["l2"], ("-", "--", ":", "-."), strict=False):  # at most four L2 rows drawn
            for r, color in (("mean", "C0"), ("last", "C1")):
                ax.plot(layers, [res[f"resid {layer} {r}, l2={l2:g}"][what] for layer in layers], style, color=color, marker="o",
                        label=f"residual, {r} (l2={l2:g})")
            saes = sorted({n.split(",")[0] for n in res if n.startswith("sae")})
            for k, color in zip(saes, ("C2", "C3", "C4", "C5"), strict=False):
                layer = int(k.split()[1])
                ax.scatter([layer], [res[f"{k}, l2={l2:g}"][what]], color=color, marker="*" if l2 == out["l2"][0] else "x", s=120,
                           label=f"SAE L{layer}, max (l2={l2:g})", zorder=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"harmful recall at {out['budget']:.0%} validation benign")
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Any-harm probes on SmolLM2-135M-Instruct: representation vs held-out recall", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
