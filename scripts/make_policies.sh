#!/usr/bin/env bash
# Makes and measures the embedded model's detector pack and the shipped policies with the bundled SAEs:
# `safeguard select` on the train split writes ONE pack (safeguard/bundled/smollm2-135m-instruct/pack.yaml, with
# pack.vectors.safetensors, pack.provenance.json and the tables in selection/ beside it); `safeguard eval` then
# measures each shipped policy (policies/default.yaml, eu.yaml, us.yaml: short files people write; regions are
# edits of them, never a selection) against that pack on the held-out split.
# Durations, one CPU thread each, measured 2026-12-02 on the shared 2-core machine: select 4 min 56 s with the
# selection caches in ~/.cache/safeguard/selection warm (prompt statistics, pooled features, refusal replies, causal
# check); filling them from cold took about 32 min (a run of the previous select, beside other work). eval 30-33 min
# each for default and eu run side by side, 14 min for us alone (unsteered replies are cached in ~/.cache/safeguard/eval and shared by all three).
set -euo pipefail
cd "$(dirname "$0")/.."
SG=${SG:-.venv/bin/safeguard}

$SG select --out safeguard/bundled/smollm2-135m-instruct/pack.yaml

for name in default eu us; do
  $SG eval "$name" --out "docs/eval/$name"
done
