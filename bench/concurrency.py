"""Concurrency benchmark: aggregate tokens/s of 1, 2, 4, 8 clients generating at once through one swarm.

A DHT node and 3 peers of SmolLM2-135M-Instruct (float32) on loopback (or behind ``--delay-ms``
proxies). Each client is a thread with its own model instance (its own client DHT node and session);
all start together at a barrier and generate ``--new-tokens`` greedy tokens, each after its own short
prompt, fresh in every round (peers keep recent histories: a repeated prompt would time cache hits;
``plan`` lists them all). Aggregate tokens/s = all new tokens / wall time from the barrier until the
last client finishes; the baseline is one client in the same run, and local transformers (one stream,
on the prompts the first client had in the baseline rounds) is shown for scale.

    .venv/bin/python -m bench.concurrency [--clients 1 2 4 8] [--trials 2] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
import time

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from bench import harness
from client import AutoDistributedModelForCausalLM

TARGET = 4.0  # 8 clients' aggregate tokens/s / one client's


def _say(msg: str) -> None:
    print(f"[concurrency] {msg}", file=sys.stderr, flush=True)


def plan(args, prompts: harness.FreshPrompts) -> dict:
    """Every prompt the run sends to the swarm: ``warmup``, a 4-token prompt per client; ``rounds``, per trial
    and per N of ``--clients``, one prompt for each of the N clients. None repeats."""
    return {"warmup": [prompts.next(4) for _ in range(max(args.clients))],
            "rounds": [[[prompts.next() for _ in range(n)] for n in args.clients] for _ in range(args.trials)]}


def _round(models, prompts: list, new_tokens: int, pad: int) -> dict:
    """All ``models`` generate at once, model i after ``prompts[i]``; returns wall seconds and per-client
    decode step times."""
    barrier = threading.Barrier(len(models) + 1)

    def one(model, ids) -> list[float]:
        clock = harness.TokenClock()
        barrier.wait(timeout=60)
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
        return clock.times

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        futures = [pool.submit(one, m, ids) for m, ids in zip(models, prompts, strict=True)]
        barrier.wait(timeout=60)
        began = time.perf_counter()
        times = [f.result(timeout=600) for f in futures]
    wall = max(t[-1] for t in times) - began
    steps = [b - a for t in times for a, b in zip(t, t[1:])]
    return {"wall_s": wall, "tokens": len(models) * new_tokens, "tokens_per_s": len(models) * new_tokens / wall,
            "median_step_s": harness.median(steps)}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, trials=2, prompt_tokens=16, delay_ms=None,
                          delay_help="one-way delay per link (default: loopback)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    return parser


def main() -> None:
    args = arguments().parse_args()
    work = harness.workload(args, _say)
    model_dir, spans, pad, prompts = work.model_dir, work.spans, work.pad, work.prompts
    todo = plan(args, prompts)

    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _round([local], [prompts.next()], args.new_tokens, pad)  # warm-up (local only)
    local_rounds = [_round([local], rounds[0][:1], args.new_tokens, pad) for rounds in todo["rounds"]]
    del local

    results: dict[int, list[dict]] = {n: [] for n in args.clients}
    opts = harness.client_options(push=True, wire_dtype=args.wire_dtype)
    _say(f"starting a DHT node and {len(spans)} peers")
    with harness.BenchSwarm(model_dir, spans, delay_ms=args.delay_ms, extra=["--num-threads", str(args.threads)]) as swarm:
        models = []
        try:
            for warm in todo["warmup"]:
                models.append(AutoDistributedModelForCausalLM.from_pretrained(
                    model_dir, swarm.initial_peers, reputation_path=None, **opts))
                _round(models[-1:], [prompts.sent(warm)], 2, pad)  # warm-up: RTTs measured, route planned
            _say(f"{len(models)} clients ready")
            for trial, rounds in enumerate(todo["rounds"]):
                for n, round_prompts in zip(args.clients, rounds):
                    results[n].append(_round(models[:n], [prompts.sent(ids) for ids in round_prompts],
                                             args.new_tokens, pad))
                    _say(f"trial {trial + 1}: {n} clients: {results[n][-1]['tokens_per_s']:.1f} tokens/s")
        finally:
            for m in models:
                m.swarm.shutdown()

    base = harness.median([r["tokens_per_s"] for r in results[args.clients[0]]])
    local_tps = harness.median([r["tokens_per_s"] for r in local_rounds])
    rows = []
    for n in args.clients:
        tps = harness.median([r["tokens_per_s"] for r in results[n]])
        rows.append({"clients": n, "tokens_per_s": tps, "ratio_to_first": tps / base,
                     "median_step_ms": harness.median([r["median_step_s"] for r in results[n]]) * 1000,
                     "target": TARGET if n == 8 else None, "met": (tps / base >= TARGET) if n == 8 else None})
    print(harness.table(
        ["clients", "aggregate tokens/s", f"x {args.clients[0]} client(s)", "median step ms per client", "target"],
        [[r["clients"], r["tokens_per_s"], f"{r['ratio_to_first']:.2f}", r["median_step_ms"],
          "" if r["target"] is None else f">= {TARGET} {'met' if r['met'] else 'MISSED'}"] for r in rows]))
    print(f"\nlocal transformers, one stream: {local_tps:.1f} tokens/s")
    mode = {"push": opts.get("push", False), "wire_dtype": opts.get("wire_dtype")}
    path = harness.write_results(harness.results_name("concurrency", args), {
        "model_dir": model_dir, "spans": spans, "mode": mode, "prompts": prompts.summary(), "summary": rows,
        "local_tokens_per_s": local_tps,
        "local_runs": local_rounds, "runs": {str(n): r for n, r in results.items()}}, args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
