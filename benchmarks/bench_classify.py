"""Cost of screening a request with a policy's detectors (``SteeredLLM.classify``, what ``SafeguardGuard`` and
``safeguard classify`` run) relative to answering it: time of classify vs unsteered generation of the same prompts.

Both run interleaved in one process on the embedded model with the default policy, greedy, so machine noise
hits them alike; the figure that matters is the ratio. Batches of 1 and 8 short prompts, and 8 prompts wrapped
in a jailbreak template (long inputs, where prefill dominates).

    python benchmarks/bench_classify.py [--tokens 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens of the generation it is compared with")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from _prompts import bench_prompts

    from safeguard import SteeredLLM

    llm = SteeredLLM.from_pretrained()
    cases = bench_prompts()
    print(f"model {llm.model_name}, policy {llm.policy.name} ({len(llm.policy.categories)} categories), generation of {args.tokens} tokens, "
          f"{args.repeats} interleaved repeats, {args.threads} thread(s)")
    for name, rows in cases.items():
        kw = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "batch_size": len(rows)}
        llm.classify(rows, batch_size=len(rows))  # warm-up
        t_classify, t_generate = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            llm.classify(rows, batch_size=len(rows))
            t_classify.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            llm.batch(rows, steer=False, **kw)
            t_generate.append(time.perf_counter() - t0)
        c, g = statistics.median(t_classify), statistics.median(t_generate)
        print(f"{name:<18} classify {c * 1000:8.1f} ms   generate {g * 1000:8.1f} ms   ratio classify / generate {c / g:.3f}")


if __name__ == "__main__":
    main()
