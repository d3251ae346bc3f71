"""``safeguard serve --ray`` under load: Ray Serve with 1 replica against 2, and one process without Ray, in one run.

The same closed-loop load as ``bench_server.py`` (its ``_level``: C client threads over httpx, a fixed number of
requests each, 127.0.0.1 only, ``safeguard/eu`` and ``safeguard/us`` alternating) against:

- ``single``: this process, no Ray: the app of ``create_app`` under uvicorn, micro-batcher on (skip: ``--no-single``);
- ``ray xN``: a local Ray cluster (``ray.init(num_cpus=2)``, the cores of the machine this was written on), the
  deployment of ``safeguard/server/ray.py`` with N replicas, each loading its own model on one torch thread and
  batching what Ray's proxy sends it.

Every deployment (one Ray Serve application per N, at ``/xN``) and the single-process server live for the whole run;
the modes then take turns, ``--rounds`` times, in an order that rotates each round, so a load spike from another job
hits one level of one mode rather than a whole mode (pairs of neighbouring levels compare under like conditions). An
idle replica holds its memory but no CPU. Ray CPUs are scheduling tokens: by default each replica reserves the
cluster's CPUs over all replicas deployed (2 / 3 for 1 + 2) so all fit at once; each still runs one torch thread.

Reported per level: completion tokens/s and requests/s over its wall time, p50/p95 latency, the 1-minute load
average after it; then the resident memory of each model-holding process, and the ratios of the medians over the
rounds (tok/s, req/s, p50, p95) for ray x2 / ray x1 and ray / single, with tok/s per round. Ray is shut down at the
end.

    python benchmarks/bench_ray.py [--replicas 1 2] [--clients 8] [--requests 16] [--tokens 32] [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_server import _level, _Live  # noqa: E402

POLICIES = {"eu": "eu", "us": "us"}  # shipped policy names


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm(base: str, n: int) -> set[int]:
    """Short requests until ``n`` replicas have answered /health (bounded), so every replica has generated once."""
    import httpx

    body = {"model": "safeguard/eu", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    pids: set[int] = set()
    with httpx.Client(timeout=300) as c, ThreadPoolExecutor(2 * n) as pool:
        for _ in range(20):  # bounded
            list(pool.map(lambda _: c.post(f"{base}/v1/chat/completions", json=body).raise_for_status(), range(2 * n)))
            pids |= set(pool.map(lambda _: c.get(f"{base}/health").json()["pid"], range(4 * n)))
            if len(pids) >= n:
                break
    return pids


def _row(mode: str, r: dict[str, float], tail: str) -> str:
    return f"{mode:<8} {r['requests']:>4} {r['tok_s']:>7.1f} {r['req_s']:>6.2f} {r['p50']:>6.2f} {r['p95']:>6.2f}  {tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="requests per mode (at least one per client)")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--replica-cpus", type=float, default=None,
                    help="Ray CPUs per replica (ray_actor_options num_cpus); default: the cluster's CPUs over all replicas deployed")
    ap.add_argument("--cluster-cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-single", action="store_true", help="skip the single-process (no Ray) figure")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import ray
    from ray import serve

    from safeguard.server import ServerConfig, create_app
    from safeguard.server.ray import build_deployment, load_pretrained

    config = ServerConfig(batch_window_s=args.window_ms / 1000, max_batch=8)
    per = max(1, args.requests // args.clients)
    replica_cpus = args.replica_cpus if args.replica_cpus is not None else args.cluster_cpus / sum(args.replicas)
    load0 = os.getloadavg()
    print(f"embedded model, policies eu/us alternating, {args.clients} clients x {per} requests, max_tokens {args.tokens}, greedy, "
          f"1 torch thread per model, window {args.window_ms} ms, max batch 8; ray.init(num_cpus={args.cluster_cpus}), "
          f"{replica_cpus:.2g} Ray CPU per replica; {os.cpu_count()} cores, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    results: dict[str, list[dict[str, float]]] = {}
    bases: dict[str, str] = {}
    rss: dict[str, str] = {}

    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=args.cluster_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    live = None
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        loader = functools.partial(load_pretrained, threads=1)
        for n in args.replicas:  # every deployment lives for the whole run, idle while another is measured
            t0 = time.perf_counter()
            serve.run(build_deployment(loader, POLICIES, config=config, replicas=n, num_cpus=replica_cpus),
                      name=f"safeguard-x{n}", route_prefix=f"/x{n}")
            mode = f"ray x{n}"
            bases[mode] = f"http://127.0.0.1:{port}/x{n}"
            pids = _warm(bases[mode], n)
            rss[mode] = ", ".join(f"{_rss_mb(p):.0f}" for p in sorted(pids)) + f" MB ({len(pids)} replica(s), ready in {time.perf_counter() - t0:.0f} s)"
        if not args.no_single:
            llm = load_pretrained(threads=1)
            live = _Live(create_app(llm, POLICIES, config=config))
            bases["single"] = live.__enter__()
            _warm(bases["single"], 1)
            rss["single"] = f"{_rss_mb(os.getpid()):.0f} MB (this process: model, clients, server)"
        modes = list(bases)
        print(f"{'round':>5} {'mode':<8} {'reqs':>4} {'tok/s':>7} {'req/s':>6} {'p50 s':>6} {'p95 s':>6}  load")
        for k in range(args.rounds):  # bounded; the order rotates so no mode always follows the same one
            for mode in modes[k % len(modes):] + modes[:k % len(modes)]:
                r = _level(bases[mode], args.clients, per, args.tokens, stream=False)
                results.setdefault(mode, []).append(r)
                print(f"{k + 1:>5} {_row(mode, r, f'{os.getloadavg()[0]:.2f}')}", flush=True)
    finally:
        if live is not None:
            live.__exit__(None, None, None)
        serve.shutdown()
        ray.shutdown()

    print("\nresident memory per model process")
    for mode in results:
        print(f"  {mode:<8} {rss[mode]}")

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    load1 = os.getloadavg()
    print(f"\nload average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"ratios of the medians over {args.rounds} round(s); tok/s per round in brackets\n{'':<18} {'tok/s':>6} {'req/s':>6} {'p50':>6} {'p95':>6}")
    pairs = []
    if len(args.replicas) > 1:
        pairs.append((f"ray x{args.replicas[-1]}", f"ray x{args.replicas[0]}"))
    if "single" in results:
        pairs += [(f"ray x{n}", "single") for n in args.replicas]
    for a, b in pairs:
        per_round = ", ".join(f"{x['tok_s'] / y['tok_s']:.2f}" for x, y in zip(results[a], results[b], strict=True))
        print(f"{a + ' / ' + b:<18} " + " ".join(f"{med(a, k) / med(b, k):>6.2f}" for k in ("tok_s", "req_s", "p50", "p95"))
              + f"  [{per_round}]")


if __name__ == "__main__":
    main()
