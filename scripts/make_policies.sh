#!/usr/bin/env bash
# Makes and measures the embedded model's detector pack and the shipped policies with the bundled SAEs:
# `safeguard select` on the train split writes ONE pack (safeguard/bundled/smollm2-135m-instruct/pack.yaml, with
# pack.vectors.safetensors, pack.provenance.json and the tables in selection/ beside it); `safeguard eval` then
# measures each shipped policy (policies/default.yaml, eu.yaml, us.yaml: short files people write; regions are
# edits of them, never a selection) against that pack on the held-out split.
# Durations, one CPU thread each (measured DURATIONS_TBD): select about SELECT_TBD with its caches in
# ~/.cache/safeguard/selection warm (prompt statistics, pooled features, refusal replies, causal check), about
# 15 min more from cold; each evaluation about EVAL_TBD (unsteered replies are cached and shared by all three).
set -euo pipefail
cd "$(dirname "$0")/.."
SG=${SG:-.venv/bin/safeguard}

$SG select --out safeguard/bundled/smollm2-135m-instruct/pack.yaml

for name in default eu us; do
  $SG eval "$name" --out "docs/eval/$name"
done
