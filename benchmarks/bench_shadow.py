"""Cost of shadow policies: prefill time with the active policy alone vs with shadow policies scored from the same
activations (``generate(..., shadow=["eu", "us"])``). Goal: at most 1.02x the prefill time without a shadow.

Prefill is timed as a one-token greedy generation (the forward pass over the prompt plus one sampling step), on
the embedded model with the ``default`` policy, both variants interleaved in one process so noise hits them alike.

    python benchmarks/bench_shadow.py [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from _prompts import bench_prompts

    from safeguard import SteeredLLM

    llm = SteeredLLM.from_pretrained()
    cases = bench_prompts()
    variants = {"no shadow": None, "shadow eu": ["eu"], "shadow eu + us": ["eu", "us"]}
    print(f"model {llm.model_name}, policy {llm.policy.name}, pack {llm.pack.id if llm.pack else None}, prefill = 1-token generation, "
          f"{args.repeats} interleaved repeats (median), {args.threads} thread(s)")
    for name, rows in cases.items():
        times: dict[str, list[float]] = {v: [] for v in variants}
        detect: dict[str, list[float]] = {v: [] for v in variants}
        for shadow in variants.values():  # warm-up, and compile the shadows once
            llm.batch(rows, max_new_tokens=1, batch_size=len(rows), shadow=shadow)
        for _ in range(args.repeats):
            for v, shadow in variants.items():
                t0 = time.perf_counter()
                out = llm.batch(rows, max_new_tokens=1, batch_size=len(rows), shadow=shadow)
                times[v].append(time.perf_counter() - t0)
                detect[v].append(out[0].report.timings["detect"])
        base = statistics.median(times["no shadow"])
        ratios = "   ".join(f"{v} {statistics.median(t) / base:.3f}x" for v, t in times.items() if v != "no shadow")
        # the detectors' own time, measured inside the hook, is far less noisy than the whole call's
        extra = "   ".join(f"{v} +{(statistics.median(detect[v]) - statistics.median(detect['no shadow'])) / base:.4f}"
                           for v in variants if v != "no shadow")
        print(f"{name:<22} no shadow {base * 1000:8.1f} ms   wall {ratios}   detector time added / prefill: {extra}")


if __name__ == "__main__":
    main()
