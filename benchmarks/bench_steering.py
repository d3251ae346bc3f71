"""Cost of gated steering on the embedded model: tokens/s of steered vs unsteered generation.

Three variants run interleaved in one process, so machine noise hits them alike; the figures that matter are
the ratios to unsteered (goal: the gated path costs at most 3%, i.e. ratio >= 0.97):

- ``unsteered``   steer=False: no hooks at all
- ``gated-idle``  the policy detects on every prompt but no category fires (the common case)
- ``gated-fire``  every category fires and steers every generated token

Every run generates exactly ``--tokens`` new tokens (``min_new_tokens``), greedy, batch 1 and batch 8.

    python benchmarks/bench_steering.py [--tokens 32] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def policies(llm):
    from safeguard import Policy

    base = llm.policy
    if base is None:
        raise SystemExit("the embedded model has no default policy; nothing to benchmark")
    data = base.model_dump(mode="json")

    def with_threshold(t: float) -> Policy:
        d = {**data, "name": f"bench-{t}", "categories": [{**c, "detect": {**c["detect"], "threshold": t}} for c in data["categories"]]}
        return Policy.from_dict(d, base_dir=base.base_dir)

    return with_threshold(1e9), with_threshold(-1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from safeguard import SteeredLLM
    from safeguard.lab.datasets import load_harmless

    llm = SteeredLLM.from_pretrained()
    idle, fire = policies(llm)
    prompts = [p.text for p in load_harmless()[:8]]
    variants = {"unsteered": {"steer": False}, "gated-idle": {"policy": idle}, "gated-fire": {"policy": fire}}
    kw = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens}
    print(f"model {llm.model_name}, policy {llm.policy.name} ({len(llm.policy.categories)} categories), {args.tokens} new tokens, "
          f"{args.repeats} interleaved repeats, {args.threads} thread(s)")
    for batch in (1, 8):
        rows = prompts[:batch]
        llm.batch(rows, **kw, steer=False)  # warm-up
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for name, extra in variants.items():
                t = time.perf_counter()
                out = llm.batch(rows, batch_size=batch, **kw, **extra)
                times[name].append(time.perf_counter() - t)
                if name == "gated-fire":
                    assert all(r.report.fired for r in out), "gated-fire must fire on every row"
                if name == "gated-idle":
                    assert not any(r.report.fired for r in out), "gated-idle must not fire"
        base = statistics.median(times["unsteered"])
        print(f"\nbatch {batch}:")
        for name in variants:
            med = statistics.median(times[name])
            tps = batch * args.tokens / med
            print(f"  {name:<11} {tps:8.1f} tok/s   ratio to unsteered {base / med:5.3f}")


if __name__ == "__main__":
    main()
