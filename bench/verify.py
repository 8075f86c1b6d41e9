"""Verification benchmark: per adversary mode, how many wrong generations a liar hands users before it is
banned, at default settings and in strict mode, sessions until the ban, false bans of honest peers; and
what verification costs in client latency (ratios against no audits, same run).

A real local swarm of a tiny 6-block Llama: honest peers for [0, 6), [0, 3) and two for [3, 6), and a
liar for [3, 6) announcing itself fastest. A claim counts for at most twice the median claim per
block of its format (client/routing.py), so the whole-model peer announces half the others' speed per
block: routes through the liar's [3, 6) then look cheapest, the liar's best case. Each trial is a fresh
client with an empty reputation book and default audit rates (a new identity's first 10 sessions are
all audited, then 25 % while on probation); "default" is verify_mode="background" (text is never
delayed, audits run after it), "strict" waits for every span, whoever served it, to be re-run
elsewhere and match. A generation is wrong if its tokens differ from local transformers' greedy ones.

    .venv/bin/python -m bench.verify [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from bench import harness
from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints, launch
from verify.policy import AuditRates
from verify.reputation import Status, Verdict

MODES = ["noise", "identity", "skip", "wrong_weights", "low_precision", "noise:0.1", "wrong_weights:0.3"]
NO_AUDITS = AuditRates.never()
TOKENS = 8


def _client(path, peers, rates=AuditRates(), verify_mode="background"):
    return AutoDistributedModelForCausalLM.from_pretrained(path, peers, audit_rates=rates, verify_mode=verify_mode,
                                                           reputation_path=None)


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(seed))


def _session(model, seed, tokens=TOKENS) -> tuple[float, list[int]]:
    """(seconds per token, the tokens)."""
    began = time.perf_counter()
    out = model.generate(_prompt(seed), max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - began) / tokens, out[0].tolist()


def _until_banned(model, liar_id: str, reference, seeds, max_sessions: int) -> tuple[int | None, int]:
    """Sessions until the liar is banned (None: not within max_sessions) and wrong generations handed over."""
    book, wrong = model.swarm.core.book, 0
    for n in range(1, max_sessions + 1):
        seed = next(seeds)
        _, tokens = _session(model, seed)
        wrong += tokens != reference(seed)
        model.swarm.wait_audits()
        if book.status(liar_id) == Status.BANNED:
            return n, wrong
    return None, wrong


def _false_bans(model, honest_ids) -> int:
    book, results = model.swarm.core.book, model.swarm.core.audits.auditor.results
    return (sum(book.status(p) == Status.BANNED for p in honest_ids)
            + sum(r.peer_id in honest_ids and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) for r in results))


def main() -> None:
    # Long on purpose: a benchmark script, its phases in the order the README reports them.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-sessions", type=int, default=100)
    parser.add_argument("--overhead-sessions", type=int, default=30)
    args = parser.parse_args()
    path = checkpoints.tiny("llama", tempfile.mkdtemp(prefix="bench-verify-"))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    references: dict[int, list[int]] = {}

    def reference(seed: int) -> list[int]:
        if seed not in references:
            references[seed] = local.generate(_prompt(seed), max_new_tokens=TOKENS, do_sample=False,
                                              pad_token_id=0)[0].tolist()
        return references[seed]

    procs = []
    try:
        dht = launch.start_dht()
        procs.append(dht)
        honest = [launch.start_peer(path, dht.maddrs, a, b, extra=["--throughput", str(t)], wait=False)
                  for a, b, t in [(0, 6, 5), (0, 3, 10), (3, 6, 10), (3, 6, 10)]]
        procs += honest
        for p in honest:
            p.wait_ready(180)
        honest_ids = {p.ready["peer_id"] for p in honest}

        # what verification costs: the same sessions with no audits, default audits and strict, interleaved
        modes = {"no audits": _client(path, dht.maddrs, NO_AUDITS), "default": _client(path, dht.maddrs),
                 "strict": _client(path, dht.maddrs, verify_mode="strict")}
        latency: dict[str, list[float]] = {name: [] for name in modes}
        try:
            for s in range(3):  # warm-up: each client measures the peers and settles on its routes
                for model in modes.values():
                    _session(model, 10**5 + s)
                    model.swarm.wait_audits()
            audits_before = {name: len(model.swarm.core.audits.auditor.results) for name, model in modes.items()}
            order = list(modes)
            for s in range(args.overhead_sessions):
                for name in order[s % 3:] + order[:s % 3]:  # rotated: no client always follows the same one
                    latency[name].append(_session(modes[name], s)[0])
            for model in modes.values():
                model.swarm.wait_audits()
            replays = {name: len(model.swarm.core.audits.auditor.results) - audits_before[name]
                       for name, model in modes.items()}
        finally:
            for model in modes.values():
                model.swarm.shutdown()
        medians = {name: statistics.median(v) for name, v in latency.items()}

        rows, false_bans, seeds = [], 0, iter(range(10**6))
        for mode in MODES:
            liar = launch.start_peer(path, dht.maddrs, 3, 6, extra=["--adversary", mode, "--throughput", "10000"])
            procs.append(liar)
            liar_id = liar.ready["peer_id"]
            result = {"default": ([], []), "strict": ([], [])}  # (sessions until banned, wrong generations)
            for trial in range(args.trials):
                for name, verify_mode in (("default", "background"), ("strict", "strict")):
                    model = _client(path, dht.maddrs, verify_mode=verify_mode)
                    try:
                        sessions, wrong = _until_banned(model, liar_id, reference, seeds, args.max_sessions)
                        if sessions is not None:
                            result[name][0].append(sessions)
                        result[name][1].append(wrong)
                        false_bans += _false_bans(model, honest_ids)
                    finally:
                        model.swarm.shutdown()
            liar.stop()
            rows.append((mode, result))
    finally:
        for p in reversed(procs):
            p.stop()

    def median(values):
        return f"{statistics.median(values):g}" if values else "—"

    print(harness.table(
        ["adversary (--adversary)", "default: wrong generations before the ban, max (median)",
         "default: sessions until banned (median)", "default: trials banned",
         "strict: wrong generations, total", "strict: sessions until banned (median)", "strict: trials banned"],
        [[mode, f"{max(r['default'][1])} ({median(r['default'][1])})", median(r["default"][0]),
          f"{len(r['default'][0])}/{args.trials}", sum(r["strict"][1]), median(r["strict"][0]),
          f"{len(r['strict'][0])}/{args.trials}"] for mode, r in rows]))
    print(f"\nfalse bans or failed verdicts of honest peers: {false_bans}")
    print(harness.table(
        ["verification", "median per-token latency (ms)", "vs no audits", "vs default", "audits per session"],
        [[name, f"{1000 * m:.1f}", f"{m / medians['no audits']:.2f}", f"{m / medians['default']:.2f}",
          f"{replays[name] / args.overhead_sessions:.2f}"] for name, m in medians.items()]))
    print("\ntargets: default <= 1 wrong generation per liar identity; strict 0")
    path_out = harness.write_results("verify", {
        "modes": {mode: r for mode, r in rows}, "false_bans": false_bans,
        "latency_ms": {k: 1000 * v for k, v in medians.items()},
        "audits_per_session": {k: v / args.overhead_sessions for k, v in replays.items()}}, args)
    print(f"\nwrote {path_out}")


if __name__ == "__main__":
    main()
