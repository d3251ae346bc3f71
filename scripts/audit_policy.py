"""Audit a policy's steered replies (issue 9 §4): sample them from `safeguard eval`'s results, then, once a reader
has labelled every row, measure the refusals a product could show and how well the automatic proxy agrees.

    python scripts/audit_policy.py sample default --n 120     # docs/eval/default/audit_todo.jsonl (label: the proxy's, to be read)
    # a reader reads every row and writes docs/eval/default/audit.jsonl (same rows, labeller "reader", label 1-4, note)
    python scripts/audit_policy.py report default              # docs/eval/default/audit.md: shares by label, proxy agreement

Rows are the replies whose action was `refuse` (refusal steering applied), drawn over every evaluation set with a
fixed seed; the reader labels by the rubric in `safeguard/lab/audit.py` without looking at the proxy's label
(`audit_todo.jsonl` keeps it in a separate field, `proxy_label`, that the reader is told to ignore).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from safeguard.lab.audit import LABELS, agreement, judge_reply, read_audit, sample_steered

ROOT = Path(__file__).resolve().parents[1]


def sample(name: str, n: int, seed: int) -> Path:
    folder = ROOT / "docs" / "eval" / name
    rows = sample_steered(folder / "results.json", n=n, seed=seed, actions=("refuse",))
    out = folder / "audit_todo.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"set": r.extra.get("set"), "prompt": r.prompt, "reply": r.reply, "policy": r.policy, "fired": list(r.fired),
                                "action": r.action, "proxy_label": r.label}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows to read: {out}")
    return out


def report(name: str) -> Path:
    folder = ROOT / "docs" / "eval" / name
    rows = read_audit(folder / "audit.jsonl")
    readers = [r for r in rows if r.labeller == "reader"]
    todo = {(t["prompt"], t["reply"]): t for t in map(json.loads, (folder / "audit_todo.jsonl").read_text(encoding="utf-8").splitlines())}
    harmful = [todo.get((r.prompt, r.reply), {}).get("set") in ("harmful", "jailbreak", "harmful_plain", "airt", "multiturn_harmful")
               for r in readers]
    proxy = [judge_reply(r.prompt, r.reply, harmful=h) for r, h in zip(readers, harmful, strict=True)]
    agree = agreement([r.label for r in readers], proxy)
    by = Counter(r.label for r in readers)
    on_harmful = Counter(r.label for r, h in zip(readers, harmful, strict=True) if h)
    refusals = by[1] + by[2]
    lines = [f"# Audit of `{name}`'s steered refusals", "",
             f"{len(readers)} replies whose action was `refuse`, sampled with `python scripts/audit_policy.py sample {name}` from "
             "`results.json` (every evaluation set, seed 0) and labelled by reading (labeller `reader`, rubric in "
             "`safeguard/lab/audit.py`); rows in `audit.jsonl`.", "",
             "| label | all audited | of them: harmful prompts |", "|---|---|---|"]
    for k, v in LABELS.items():
        lines.append(f"| {k} {v} | {by[k]} ({by[k] / max(len(readers), 1):.0%}) | {on_harmful[k]} |")
    lines += ["", f"Acceptable refusals (label 1) among steered replies that refuse (labels 1 and 2): **{by[1]} of {refusals} "
              f"({by[1] / max(refusals, 1):.0%})**; goal >= 80%.", "",
              f"Proxy (`judge_reply`) against the reader on the same rows: accuracy {agree['accuracy']:.2f}, Cohen's kappa "
              + (f"{agree['kappa']:.2f}" if agree["kappa"] is not None else "n/a") + f" (n={agree['n']}).", "",
              "| reader \\ proxy | " + " | ".join(str(k) for k in agree["confusion"]) + " |", "|---|" + "---|" * len(agree["confusion"])]
    for a, row in agree["confusion"].items():
        lines.append(f"| {a} | " + " | ".join(str(v) for v in row.values()) + " |")
    out = folder / "audit.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(out.read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("name")
    s.add_argument("--n", type=int, default=120)
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("name")
    a = ap.parse_args()
    sample(a.name, a.n, a.seed) if a.cmd == "sample" else report(a.name)


if __name__ == "__main__":
    main()
