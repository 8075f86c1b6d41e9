"""``python -m sim``: run every policy pair on one seeded workload, print the table, write the plots.

    python -m sim --peers 1000 --clients 10000 --hours 0.3 --warmup 480 --seed 0 --out docs   # ~6 min on 2 cores
    python -m sim --quick          # 60 peers, 300 clients, 20 simulated minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time

from sim import geo, report
from sim.engine import SimConfig, run
from sim.policies import POLICIES
from sim.workload import WorkloadConfig, make_workload


def _run_one(args: tuple[WorkloadConfig, SimConfig]):
    wcfg, scfg = args
    began = time.perf_counter()
    result = run(make_workload(wcfg), scfg)  # each process draws the same workload from the seed
    return result, time.perf_counter() - began


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=1000, help="peers online on average")
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--hours", type=float, default=0.3, help="simulated hours (the first --warmup s are not measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs", help="folder for sim.png")
    p.add_argument("--json", help="also write every result (metrics, series) to this file")
    p.add_argument("--quick", action="store_true", help="60 peers, 300 clients, 20 simulated minutes")
    p.add_argument("--jobs", type=int, default=2, help="policies run in parallel (processes)")
    p.add_argument("--policies", default="all", help="comma-separated PLACEMENT+ROUTING pairs, e.g. ours+ours")
    p.add_argument("--warmup", type=float, default=480.0, help="seconds")
    p.add_argument("--think", type=float, default=WorkloadConfig.think_mean, help="mean seconds between sessions")
    p.add_argument("--refresh", type=float, default=SimConfig.refresh, help="seconds between client snapshots")
    p.add_argument("--balance-period", type=float, default=SimConfig.balance_period, help="seconds")
    p.add_argument("--threshold", type=float, default=SimConfig.balance_threshold, help="ours: should_move threshold")
    p.add_argument("--load-factor", type=float, default=SimConfig.load_factor)
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.peers, args.clients, args.hours, args.warmup = 60, 300, 1 / 3, 300.0
    wcfg = WorkloadConfig(peers=args.peers, clients=args.clients, duration=args.hours * 3600, seed=args.seed,
                          think_mean=args.think)
    pairs = POLICIES if args.policies == "all" else tuple(tuple(x.split("+")) for x in args.policies.split(","))
    base = SimConfig(warmup=args.warmup, refresh=args.refresh, balance_period=args.balance_period,
                     balance_threshold=args.threshold, load_factor=args.load_factor)
    jobs = [(wcfg, dataclasses.replace(base, placement=pl, routing=ro)) for pl, ro in pairs]
    began = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(jobs))) as pool:
            done = pool.map(_run_one, jobs)
    else:
        done = [_run_one(j) for j in jobs]
    results = [r for r, _ in done]
    print(f"{args.peers} peers, {args.clients} clients, {args.hours:g} h simulated (measured after "
          f"{args.warmup:g} s), seed {args.seed}; wall {time.perf_counter() - began:.0f} s "
          f"({', '.join(f'{r.name}: {s:.0f} s' for r, s in done)})\n")
    print(report.table(results))
    if args.json:
        report.save_json(results, args.json)
    if not args.no_plot:
        path = os.path.join(args.out, "sim.png")
        report.plot(results, path, args.warmup)
        print(f"\nplots: {path}")
    print("\nround trips between region centres:\n" + geo.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
