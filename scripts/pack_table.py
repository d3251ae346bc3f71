"""Print the Markdown table of a detector pack's operating points: per category each level's threshold with the
false-positive rate and recall measured on validation prompts.

    .venv/bin/python scripts/pack_table.py safeguard/bundled/smollm2-135m-instruct/pack.yaml
"""

from __future__ import annotations

import sys

from safeguard.runtime.pack import LEVELS, Pack


def cell(p) -> str:
    fpr = "n/a" if p.fpr is None else f"{100 * p.fpr:.1f}%"
    rec = "n/a" if p.recall is None else f"{100 * p.recall:.0f}%"
    return f"{p.threshold:.3f} ({fpr} / {rec})"


def main(path: str) -> None:
    pack = Pack.load(path)
    prov = pack.provenance_data()
    n_val = prov.get("detection", {})
    print("| Category (validation harmful n) | " + " | ".join(LEVELS) + " |")
    print("|---|" + "---|" * len(LEVELS))
    for cid, pc in pack.categories.items():
        n = n_val.get(cid, {}).get("n_val_own_harmful", "?")
        print(f"| {cid} ({n}) | " + " | ".join(cell(pc.levels[lv]) for lv in LEVELS) + " |")
    anyc = prov.get("levels", {}).get("any_category_on_validation", {})
    if anyc:
        print("| (any category: harmful fired / benign fired) | " + " | ".join(
            f"{100 * anyc[lv]['val_harmful_fired']:.1f}% / {100 * anyc[lv]['val_benign_fired']:.1f}%" for lv in LEVELS) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "safeguard/bundled/smollm2-135m-instruct/pack.yaml")
