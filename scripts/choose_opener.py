"""Choose the refusal opener from the embedded model's own refusal style (issue 9 §4).

Runs the *unsteered* embedded model (SmolLM2-135M-Instruct, greedy, 48 new tokens, batch 8, one torch thread) on
60 harmful prompts of the train split's select part (``selection_data().harmful_select``, never the held-out split),
keeps the replies the project's phrase judge calls refusals (``safeguard.lab.refusal.is_refusal``), and counts
their opening sentences, their opening clauses (up to the first comma) and the refusal phrases in them.

The model's own refusals (15 of 60 on 2026-12 runs) share one shape, "I'm sorry for any misunderstanding, but as a
chatbot designed to assist with X, I don't have the ability to Y.", and no whole sentence repeats. So the opener is
composed from the counted pieces and ranked by the model itself: candidates are "I'm sorry, but" + each counted
refusal core (plus the phrase judge's "I can't") + "help with that.", and the one with the highest mean log-probability
per token under the unsteered model, after the assistant header of these 60 prompts, is chosen. Candidates must be
refusals by ``is_refusal``, coherent refusals by the proxy (``safeguard.lab.audit.judge_reply`` label 1) and at most
``MAX_OPENER`` characters. The apology stays bare ("I'm sorry, but"): the model's "sorry for any misunderstanding"
apologises for something that did not happen (the rubric's label 2), and is how the steered non-sequiturs begin.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/choose_opener.py [--n 60] [--out docs/eval/opener_choice.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def opening_clause(reply: str) -> str:
    """The reply's first clause: up to and including the first '.', '!' or '?' followed by a space or the end, or up to
    the first line break."""
    text = reply.strip().split("\n", 1)[0].strip()
    m = re.search(r"[.!?](\s|$)", text)
    return text[: m.start() + 1] if m else text


def mean_logprob(llm, prompts: list[str], opener: list[int]) -> float:
    """Mean over prompts of the opener's log-probability per token, as the continuation after each prompt's header."""
    import torch

    total = 0.0
    with torch.inference_mode():
        for prompt in prompts:
            ids = llm._encode_one(prompt, True)[0] + opener
            logits = llm.model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[-len(opener) - 1:-1], -1)
            total += float(logp[torch.arange(len(opener)), torch.tensor(opener)].mean())
    return total / len(prompts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out", default="docs/eval/opener_choice.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from safeguard import SteeredLLM
    from safeguard._hashing import stable_hash
    from safeguard.lab.audit import judge_reply
    from safeguard.lab.refusal import is_refusal
    from safeguard.lab.selection.data import selection_data
    from safeguard.runtime.openers import MAX_OPENER, opener_tokens

    prompts = sorted(selection_data().harmful_select, key=lambda p: stable_hash("opener", p.text))[: args.n]
    llm = SteeredLLM.from_pretrained()
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    cached = old.get("replies") or []
    if [r["prompt"] for r in cached] == [p.text for p in prompts] and old.get("model") == llm.model_name:
        replies, took = [r["reply"] for r in cached], 0.0  # the same greedy replies: read back, not generated again
    else:
        t0 = time.perf_counter()
        replies = [r.text for r in llm.batch([p.text for p in prompts], steer=False, max_new_tokens=48, batch_size=8)]
        took = time.perf_counter() - t0
    refusals = [r for r in replies if is_refusal(r)]
    sentences = collections.Counter(opening_clause(r) for r in refusals)
    clauses = collections.Counter(r.strip().split(",", 1)[0] for r in refusals)
    core_re = r"\b(I (?:don't|do not) have the (?:ability|capability) to|I'm not (?:equipped|able) to|I'm unable to|I can(?:'t|not)|I won't)"
    cores = collections.Counter(m.group(1) for r in refusals for m in [re.search(core_re, r)] if m)
    print(f"{len(prompts)} harmful select-part prompts, {len(refusals)} unsteered refusals ({took:.0f} s generating)")
    for title, counter in (("opening sentences", sentences), ("opening clauses (to the first comma)", clauses), ("refusal cores", cores)):
        print(f"-- {title}")
        for c, n in counter.most_common():
            print(f"{n:3d}  {c!r}")
    pieces = [c for c, _ in cores.most_common()] + [c for c in ("I can't",) if c not in cores]
    candidates = [f"I'm sorry, but {c} help with that." for c in pieces]
    candidates = [c for c in candidates if len(c) <= MAX_OPENER and is_refusal(c) and judge_reply("", c) == 1]
    scores = {c: mean_logprob(llm, [p.text for p in prompts], list(opener_tokens(llm.tokenizer, c))) for c in candidates}
    print("-- candidates, mean log-probability per token after the assistant header (unsteered)")
    for c, v in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{v:8.3f}  {c!r}")
    chosen = max(scores, key=scores.get) if scores else None
    print(f"chosen opener: {chosen!r}")
    out = {"command": " ".join(["python", *sys.argv]), "model": llm.model_name, "prompts": len(prompts), "refusals": len(refusals),
           "opening_sentences": sentences.most_common(), "opening_clauses": clauses.most_common(), "refusal_cores": cores.most_common(),
           "candidates": scores, "chosen": chosen, "max_opener_chars": MAX_OPENER,
           "replies": [{"prompt": p.text, "reply": r, "refusal": is_refusal(r)} for p, r in zip(prompts, replies, strict=True)]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
