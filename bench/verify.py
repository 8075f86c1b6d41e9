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
Every generation has a prompt of its own (peers keep recent histories: a prompt the three latency
clients shared would be computed once and served twice from the cache); ``plan`` lists the latency part's.

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
PROMPT_TOKENS = 8
VOCAB = 250  # prompts are random ids in [3, VOCAB)
OVERHEAD = ["no audits", "default", "strict"]  # the latency part's clients
WARMUP = 3  # sessions per latency client before the timed ones


def _client(path, peers, rates=AuditRates(), verify_mode="background"):
    return AutoDistributedModelForCausalLM.from_pretrained(path, peers, audit_rates=rates, verify_mode=verify_mode,
                                                           reputation_path=None)


def prompt_source() -> harness.FreshPrompts:
    return harness.FreshPrompts(PROMPT_TOKENS, vocab=VOCAB)


def plan(args, prompts: harness.FreshPrompts) -> dict:
    """The latency part's prompts: ``warmup``, ``WARMUP`` rounds and ``sessions``, ``--overhead-sessions``
    rounds, each round one prompt per client of ``OVERHEAD`` (in that order). None repeats; the liar part
    then draws its prompts from the same source as it goes (sessions until a ban are not known ahead)."""
    return {"warmup": [[prompts.next() for _ in OVERHEAD] for _ in range(WARMUP)],
            "sessions": [[prompts.next() for _ in OVERHEAD] for _ in range(args.overhead_sessions)]}


def _session(model, ids, tokens=TOKENS) -> tuple[float, list[int]]:
    """(seconds per token, the tokens)."""
    began = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - began) / tokens, out[0].tolist()


def _until_banned(model, liar_id: str, reference, draw, max_sessions: int) -> tuple[int | None, int]:
    """Sessions until the liar is banned (None: not within max_sessions) and wrong generations handed over;
    ``draw()`` gives each session's prompt."""
    book, wrong = model.swarm.core.book, 0
    for n in range(1, max_sessions + 1):
        ids = draw()
        _, tokens = _session(model, ids)
        wrong += tokens != reference(ids)
        model.swarm.wait_audits()
        if book.status(liar_id) == Status.BANNED:
            return n, wrong
    return None, wrong


def _false_bans(model, honest_ids) -> int:
    book, results = model.swarm.core.book, model.swarm.core.audits.auditor.results
    return (sum(book.status(p) == Status.BANNED for p in honest_ids)
            + sum(r.peer_id in honest_ids and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) for r in results))


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-sessions", type=int, default=100)
    parser.add_argument("--overhead-sessions", type=int, default=30)
    return parser


def main() -> None:
    # Long on purpose: a benchmark script, its phases in the order the README reports them.
    args = arguments().parse_args()
    path = checkpoints.tiny("llama", tempfile.mkdtemp(prefix="bench-verify-"))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    references: dict[tuple, list[int]] = {}
    prompts = prompt_source()
    todo = plan(args, prompts)

    def reference(ids) -> list[int]:
        key = tuple(ids[0].tolist())
        if key not in references:
            references[key] = local.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)[0].tolist()
        return references[key]

    def draw() -> torch.Tensor:  # the liar part: 8 random ids, at most the first one shared (a 247-id vocabulary)
        return prompts.sent(prompts.next(shared_prefix=1))

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
        modes = dict(zip(OVERHEAD, [_client(path, dht.maddrs, NO_AUDITS), _client(path, dht.maddrs),
                                    _client(path, dht.maddrs, verify_mode="strict")], strict=True))
        latency: dict[str, list[float]] = {name: [] for name in modes}
        try:
            for warm in todo["warmup"]:  # warm-up: each client measures the peers and settles on its routes
                for model, ids in zip(modes.values(), warm):
                    _session(model, prompts.sent(ids))
                    model.swarm.wait_audits()
            audits_before = {name: len(model.swarm.core.audits.auditor.results) for name, model in modes.items()}
            order = list(modes)
            for s, round_prompts in enumerate(todo["sessions"]):
                mine = dict(zip(OVERHEAD, round_prompts, strict=True))
                for name in order[s % 3:] + order[:s % 3]:  # rotated: no client always follows the same one
                    latency[name].append(_session(modes[name], prompts.sent(mine[name]))[0])
            for model in modes.values():
                model.swarm.wait_audits()
            replays = {name: len(model.swarm.core.audits.auditor.results) - audits_before[name]
                       for name, model in modes.items()}
        finally:
            for model in modes.values():
                model.swarm.shutdown()
        medians = {name: statistics.median(v) for name, v in latency.items()}

        rows, false_bans = [], 0
        for mode in MODES:
            liar = launch.start_peer(path, dht.maddrs, 3, 6, extra=["--adversary", mode, "--throughput", "10000"])
            procs.append(liar)
            liar_id = liar.ready["peer_id"]
            result = {"default": ([], []), "strict": ([], [])}  # (sessions until banned, wrong generations)
            for trial in range(args.trials):
                for name, verify_mode in (("default", "background"), ("strict", "strict")):
                    model = _client(path, dht.maddrs, verify_mode=verify_mode)
                    try:
                        sessions, wrong = _until_banned(model, liar_id, reference, draw, args.max_sessions)
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
        "audits_per_session": {k: v / args.overhead_sessions for k, v in replays.items()},
        "prompts": prompts.summary()}, args)
    print(f"\nwrote {path_out}")


if __name__ == "__main__":
    main()
