#!/usr/bin/env bash
# Makes and measures the embedded model's shipped policies (policies/default.yaml, eu.yaml, us.yaml) with the
# bundled SAEs: `safeguard select` on the train split, then `safeguard eval` on the held-out split.
# One CPU thread each: about 13 min for the first selection and 4 for each other one (prompt statistics are
# cached in ~/.cache/safeguard), about 20 min per evaluation (unsteered replies are cached and shared).
set -euo pipefail
cd "$(dirname "$0")/.."
SG=${SG:-.venv/bin/safeguard}

$SG select --out policies/default.yaml --name default \
  --description "Every AIR-Bench 2024 category with enough training prompts is detected at layer 10 and refused with layer-20 SAE refusal features."

$SG select --out policies/eu.yaml --name eu \
  --strict privacy --strict discrimination_bias --strict hate_toxicity --strict operational_misuses \
  --description "EU-style deployment: every category refused; privacy (GDPR), discrimination (AI Act, equal treatment), illegal hate speech (DSA) and automated decisions in regulated domains (AI Act high-risk uses) detected more sensitively."

$SG select --out policies/us.yaml --name us \
  --redirect misinformation --redirect hate_toxicity --disable operational_misuses \
  --description "US-style deployment: misinformation and hateful speech are steered towards factual, respectful content (redirect) rather than refused; advice in regulated domains is not enforced; every other category is refused."

for name in default eu us; do
  $SG eval policies/$name.yaml --out docs/eval/$name
done
