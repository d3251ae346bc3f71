#!/usr/bin/env bash
# Makes and measures the embedded model's detector pack and the shipped policies with the bundled SAEs:
# `safeguard select` on the train split writes ONE pack (safeguard/bundled/smollm2-135m-instruct/pack.yaml, with
# pack.vectors.safetensors, pack.provenance.json and the tables in selection/ beside it); `safeguard eval` then
# measures each shipped policy (policies/default.yaml, eu.yaml, us.yaml: short files people write; regions are
# edits of them, never a selection) against that pack on the held-out split.
# Durations, one CPU thread each, on the shared 2-core machine (2026-12-02, third selection): select from cold about
# 35 min beside other work (prompt statistics 14 min, pooled candidates 8 min, model replies, causal check, reply
# scores, sweep); with the caches in ~/.cache/safeguard/selection warm, the sweep alone (about 6 min). The eval
# durations are in docs/policies.md. The opener is the model's own refusal style (scripts/choose_opener.py); the
# refusal style, positions and strengths come from the comparison in docs/eval/refusal_styles.md, and ending the reply
# with the opener (--after-opener end) from docs/eval/refusal_styles_end.md (validation only). With the reply ended by
# the opener, the sweep cannot tell strengths apart (prompt-fired rows never reach the steering), so the strength the
# last sweep chose with steered continuations, 0.375, is fixed; it steers rows that fire only in the reply.
# A fresh select from cold rewrote the previous pack byte for byte (2026-12-02, 48 min beside other jobs).
# Detection reads the last 64 tokens of the last user turn (--window 64; docs/eval/windows.md, chosen on validation
# prompts in the train templates). With the window, leave-one-source-out prefers top32->12 at L2 0.01, whose
# validation sweep refuses +9 points of benign prompts (over the 4-point budget); the configuration shipped before,
# top64->48 at L2 1, is fixed instead (+3). Rerun with warm caches, this rewrote the pack byte for byte (2026-12-03).
# Every detector adds a shared any-harm probe (--shared-harm 1 --shared-features 256 --shared-l2 0.1), fitted on the plain
# positives of every category: chosen by leave-one-source-out with select's own calibration (scripts/compare_shared.py,
# docs/eval/shared.md; selection's data only). Warm caches: about 8 minutes (2026-12-03).
# The policies (policies/*.yaml, written by people) turn reply watching off since default 2.1.0: on validation prompts it
# refused no more harmful prompts and changed 7.9% of benign replies (scripts/reply_watch_value.py, docs/eval/reply_watch.json).
# What limits detection, on selection's data: scripts/ceiling.py (docs/eval/ceiling.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SG=${SG:-.venv/bin/safeguard}

$SG select --out safeguard/bundled/smollm2-135m-instruct/pack.yaml --refusal-style dense --positions generated \
  --opener "I'm sorry, but I don't have the ability to help with that." --after-opener end --strength 0.375 --max-val-fpr 0.04 --min-margin -1.0 \
  --window 64 --n-detect-candidates 64 --n-detect-features 48 --detect-l2 1 --shared-harm 1 --shared-features 256 --shared-l2 0.1

for name in default eu us; do
  $SG eval "$name" --out "docs/eval/$name"
done
$SG eval default --out docs/eval/default-baselines --baselines system_prompt,self_check,dense_direction --baseline-n 12
