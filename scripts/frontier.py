"""The detection frontier of a policy on the held-out sets: how much harmful recall each extra point of over-refusal buys.

Issue 9 asks, where a goal is out of reach on the 135M model, for the frontier and what limits it. Refusal follows
detection (on the held-out sets, almost every fired harmful row is refused and almost none that did not fire), so
this measures detection alone, from prefill (``classify``; no generation, reply watching not included):

- every prompt of ``safeguard eval``'s sets (same sizes and seed as ``safeguard eval``'s defaults) is scored by the
  policy's detectors; its *margin* is ``max over enforced categories of (score - threshold)``;
- moving every category's threshold by the same ``delta`` fires a prompt when its margin >= ``delta``; ``delta = 0``
  is the policy as shipped. Probe scores are logits of similar scale across categories, so one shift is a fair
  single knob, not the per-category optimum.

It only *measures* the shipped detectors on evaluation sets; nothing is chosen from it (choosing thresholds here
would tune on the evaluation sets). Writes ``<out>.json`` and ``<out>.png``::

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/frontier.py default --out docs/eval/frontier
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HARMFUL = ("harmful", "harmful_plain", "airt", "multiturn_harmful", "jailbreak")
BENIGN = ("benign", "benign_blind", "risky", "risky_eval", "risky_blind", "jailbreak_benign", "multiturn_benign", "capability")
DELTAS = [round(-4.0 + 0.25 * i, 2) for i in range(33)]


def margins(llm, prompts: list, policy) -> list[float]:
    out = []
    for lo in range(0, len(prompts), 16):
        for r in llm.classify(prompts[lo:lo + 16], policy=policy):
            live = [d.score - d.threshold for d in r.decisions if d.response != "off"]
            out.append(max(live) if live else float("-inf"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policy", nargs="?", default="default")
    ap.add_argument("--out", default="docs/eval/frontier")
    ap.add_argument("--pack", default=None, help="a detector pack's YAML instead of the bundled one (to compare packs)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from safeguard import Policy, SteeredLLM
    from safeguard.lab.evaluation.run import _groups
    from safeguard.lab.evaluation.sets import eval_sets

    sets = eval_sets(n_risky_eval=80, n_harmful_plain=80, n_airt=80, n_multiturn_benign=40, n_multiturn_harmful=40)  # safeguard eval's defaults
    llm = SteeredLLM.from_pretrained(pack=args.pack)
    policy = llm.compile_policy(Policy.load(args.policy))
    t0 = time.perf_counter()
    per_set = {}
    for name, prompts, _ in _groups(sets):
        if prompts:
            per_set[name] = margins(llm, prompts, policy)
            print(f"{name}: {len(prompts)} prompts, {sum(m >= 0 for m in per_set[name])} fire as shipped", flush=True)

    def rate(ms: list[float], d: float) -> float:
        return sum(m >= d for m in ms) / len(ms)

    curves = {n: [rate(ms, d) for d in DELTAS] for n, ms in per_set.items()}
    harmful = [m for n in HARMFUL if n in per_set for m in per_set[n]]
    risky = [m for n in ("risky_eval", "risky_blind") if n in per_set for m in per_set[n]]
    pooled = {"harmful (all harmful sets)": [rate(harmful, d) for d in DELTAS], "risky-looking benign (eval part + blind)": [rate(risky, d) for d in DELTAS]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "policy": args.policy, "pack": llm.pack.id,
                                                    "pack_hash": llm.pack.short_hash, "deltas": DELTAS, "fired": curves, "pooled": pooled,
                                                    "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
    plot(Path(args.out), curves, pooled, args.policy)
    return 0


def plot(out: Path, curves: dict, pooled: dict, policy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, ys in curves.items():
        ax.plot(DELTAS, ys, ("-" if n in HARMFUL else "--"), label=n, lw=1.4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("threshold shift (every category; 0 = shipped)")
    ax.set_ylabel("share of prompts firing any category")
    ax.set_title(f"{policy}: detection by set (solid harmful, dashed benign)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    h, r = pooled["harmful (all harmful sets)"], pooled["risky-looking benign (eval part + blind)"]
    bx.plot(r, h, marker=".")
    i0 = DELTAS.index(0.0)
    bx.scatter([r[i0]], [h[i0]], color="red", zorder=3, label="shipped thresholds")
    for name in ("jailbreak_benign", "multiturn_benign"):
        if name in curves:
            bx.plot(curves[name], h, lw=0.8, ls=":", label=f"vs {name}")
    bx.set_xlabel("benign prompts firing (over-refusal at the prompt)")
    bx.set_ylabel("harmful prompts firing")
    bx.set_xlim(0, 1)
    bx.set_ylim(0, 1)
    bx.set_title("frontier: harmful caught vs risky-looking benign caught", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=90)


if __name__ == "__main__":
    sys.exit(main())
