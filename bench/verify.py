"""Verification benchmark: per adversary mode, sessions until the liar is banned (median over trials),
false bans of honest peers, and the audits' overhead on client latency (ratio, same run).

A real local swarm of a tiny 6-block Llama: an honest peer for [0, 6), two honest (slow) peers for
[3, 6), and a liar for [3, 6) announcing itself fastest so routes prefer it. Each trial is a fresh
client with default audit rates (a new peer is on probation: p = 0.25) and an empty reputation book.

    .venv/bin/python -m bench.verify [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints, launch
from verify.policy import AuditRates
from verify.reputation import Status, Verdict

MODES = ["noise", "identity", "skip", "wrong_weights", "low_precision", "noise:0.1"]
NO_AUDITS = AuditRates(0.0, 0.0, 0.0, 0.0)


def _client(path, peers, rates):
    return AutoDistributedModelForCausalLM.from_pretrained(path, peers, audit_rates=rates, reputation_path=None)


def _session(model, seed, tokens=16):
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(seed))
    began = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - began) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-sessions", type=int, default=200)
    parser.add_argument("--overhead-sessions", type=int, default=30)
    args = parser.parse_args()
    path = checkpoints.tiny("llama", tempfile.mkdtemp(prefix="bench-verify-"))
    procs = []
    try:
        dht = launch.start_dht()
        procs.append(dht)
        honest = [launch.start_peer(path, dht.maddrs, a, b, extra=["--throughput", "10"], wait=False)
                  for a, b in [(0, 6), (3, 6), (3, 6)]]
        procs += honest
        for p in honest:
            p.wait_ready(180)
        honest_ids = {p.ready["peer_id"] for p in honest}

        # audit overhead: the same sessions with default audit rates and with none, interleaved
        with_audits, without = _client(path, dht.maddrs, AuditRates()), _client(path, dht.maddrs, NO_AUDITS)
        try:
            on, off = [], []
            for s in range(args.overhead_sessions):
                on.append(_session(with_audits, s))
                off.append(_session(without, s))
            with_audits.swarm.wait_audits()
            audited = len(with_audits.swarm.core.auditor.results)
        finally:
            with_audits.swarm.shutdown()
            without.swarm.shutdown()
        overhead = statistics.median(on) / statistics.median(off)

        rows, false_bans = [], 0
        for mode in MODES:
            liar = launch.start_peer(path, dht.maddrs, 3, 6, extra=["--adversary", mode, "--throughput", "10000"])
            procs.append(liar)
            liar_id, counts = liar.ready["peer_id"], []
            for trial in range(args.trials):
                model = _client(path, dht.maddrs, AuditRates())
                try:
                    book = model.swarm.core.book
                    for n in range(1, args.max_sessions + 1):
                        _session(model, 1000 * trial + n, tokens=8)
                        model.swarm.wait_audits()
                        if book.status(liar_id) == Status.BANNED:
                            counts.append(n)
                            break
                    false_bans += sum(book.status(p) == Status.BANNED for p in honest_ids)
                    false_bans += sum(r.peer_id in honest_ids and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)
                                      for r in model.swarm.core.auditor.results)
                finally:
                    model.swarm.shutdown()
            liar.stop()
            caught = len(counts)
            rows.append((mode, statistics.median(counts) if counts else float("nan"), caught))
    finally:
        for p in reversed(procs):
            p.stop()

    print(f"| adversary (--adversary) | sessions until banned, median of {args.trials} | trials caught |")
    print("|---|---|---|")
    for mode, median, caught in rows:
        print(f"| {mode} | {median:g} | {caught}/{args.trials} |")
    print(f"\nfalse bans or failed verdicts of honest peers: {false_bans}")
    print(f"audit overhead: median per-token latency with default audit rates / without audits = {overhead:.3f} "
          f"({audited} of {args.overhead_sessions} sessions' spans audited)")


if __name__ == "__main__":
    main()
