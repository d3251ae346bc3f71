"""Time to first token of a stream that joins a running batch, against the same stream alone, in one run (no HTTP).

Isolates the engine from the server: with iteration-level batching (``BatchingConfig(mode="iteration")``) a request
that arrives while ``--running`` rows decode is prefilled between two decode steps and joins them; with the window
micro-batcher (``--mode window``) it waits for the running batch to end. Background rows loop on long generations
(bounded by ``--seconds``); the measured stream alternates with solo measurements so noise hits both alike.

    python benchmarks/bench_join_ttft.py [--running 7] [--repeats 7] [--mode iteration] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

PROMPT = "Give me three tips for a good night's sleep."
BACKGROUND = "Write a long story about a dragon who learns to bake bread."


def _ttft(llm, policy: str) -> float:
    t0 = time.perf_counter()
    with llm.stream(PROMPT, max_new_tokens=16, policy=policy) as s:
        next(iter(s))
        first = time.perf_counter() - t0
        for _ in s:
            pass
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, default=7, help="rows decoding while the measured stream arrives")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mode", choices=["iteration", "window"], default="iteration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=300, help="upper bound on the background loops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safeguard import BatchingConfig, SteeredLLM

    llm = SteeredLLM.from_pretrained(batching=BatchingConfig(window_ms=10, max_batch=args.running + 1, mode=args.mode))
    llm.generate("warm up", max_new_tokens=4)
    solo = [_ttft(llm, "eu") for _ in range(args.repeats)]
    stop, deadline = threading.Event(), time.monotonic() + args.seconds

    def background() -> None:
        while not stop.is_set() and time.monotonic() < deadline:  # bounded
            llm.generate(BACKGROUND, max_new_tokens=96, policy="us")

    threads = [threading.Thread(target=background, daemon=True) for _ in range(args.running)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the background rows are decoding
    joined = []
    for _ in range(args.repeats):
        joined.append(_ttft(llm, "eu"))
        time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    s, j = statistics.median(solo), statistics.median(joined)
    print(f"model {llm.model_name}, mode {args.mode}, {args.threads} torch thread(s), {args.running} rows running, {args.repeats} repeats")
    print(f"time to first token, median: alone {s:.3f} s, joining {j:.3f} s; ratio {j / s:.2f} (max {max(joined) / s:.2f})")


if __name__ == "__main__":
    main()
