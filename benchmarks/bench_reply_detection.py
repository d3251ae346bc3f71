"""Cost of watching the reply: decode time per token with reply detection on vs off, on rows that never fire.
Goal: at most 1.01x the decode time with it off.

Rows must not fire, and the shipped pack's reply thresholds would fire on some, so a copy of the pack is written to a
temporary folder with ``reply: {threshold: 1e9}`` on every category (scored every step, never fires); the ``default`` policy runs on it
with ``defaults: {watch_reply: true}`` (on; the shipped policy has it off) and ``false`` (off). Decode time per token = (time of an N-token greedy
generation - time of a 1-token one) / (N - 1), ``min_new_tokens`` keeping every row to N tokens; both variants
interleaved in one process so noise hits them alike. The detector's own time (measured inside the hook) is printed too.

    python benchmarks/bench_reply_detection.py [--repeats 5] [--tokens 48] [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from _prompts import bench_prompts

    from safeguard import Policy, SteeredLLM
    from safeguard.runtime.pack import find_pack

    shipped = find_pack("SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    folder = Path(tempfile.mkdtemp(prefix="bench-reply-"))
    try:
        for f in Path(shipped.base_dir).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
        data = yaml.safe_load((folder / "pack.yaml").read_text())
        for c in data["categories"].values():
            c["reply"] = {"threshold": 1e9}
        (folder / "pack.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        llm = SteeredLLM.from_pretrained(pack=folder / "pack.yaml")
        default = Policy.load("default")
        on, off = default.with_defaults("default-reply", watch_reply=True), default.with_defaults("default-no-reply", watch_reply=False)
        variants = {"off": off, "on": on}
        watched = sum(len(d.categories) for d in llm.compile_policy(on).reply.values())
        print(f"model {llm.model_name}, policy default on pack {llm.pack.id} + reply thresholds 1e9 ({watched} categories watched), "
              f"{args.tokens} tokens, {args.repeats} interleaved repeats (median), {args.threads} thread(s)")
        for name, rows in list(bench_prompts().items())[:2]:
            n = len(rows)
            def gen(p: Policy, k: int, rows: list[str] = rows, n: int = n) -> list:
                return llm.batch(rows, policy=p, max_new_tokens=k, min_new_tokens=k, batch_size=n)

            for p in variants.values():  # warm-up
                gen(p, 2)
            times: dict[str, list[float]] = {v: [] for v in variants}
            detect: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.repeats):
                for v, p in variants.items():
                    t0 = time.perf_counter()
                    gen(p, 1)
                    t1 = time.perf_counter()
                    out = gen(p, args.tokens)
                    t2 = time.perf_counter()
                    assert all(not r.report.fired for r in out), "a row fired: the benchmark measures rows that never fire"
                    times[v].append(((t2 - t1) - (t1 - t0)) / (args.tokens - 1))
                    detect[v].append(out[0].report.timings["detect"] / args.tokens)
            base, with_reply = statistics.median(times["off"]), statistics.median(times["on"])
            added = statistics.median(detect["on"]) - statistics.median(detect["off"])
            print(f"{name:<10} decode per token: off {base * 1000:7.2f} ms   on {with_reply * 1000:7.2f} ms   ratio {with_reply / base:.3f}x   "
                  f"reply detector time per token {added * 1e6:6.1f} us ({added / base:.4f} of a token)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
