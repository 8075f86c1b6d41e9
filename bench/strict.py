"""What strict verification costs (issue 24): ``python -m bench.strict [--sessions 6]``.

The swarm of ``bench.verify`` (a tiny 6-block Llama; honest peers for [0, 6), [0, 3) and two for [3, 6)),
two clients: default audits (``background``: the reply never waits) and ``strict`` (every span any peer
served is re-run on another peer and must match before generate() returns). For 8- and 128-token greedy
generations, alternating between the clients (who goes first rotates), each generation on a prompt no
peer has seen (peers keep recent histories: a repeated prompt is a cache hit), and the default client's
background audits are waited for after each generation (so neither client's timing carries the other's
audits). Reported: the median per-token latency of each and their ratio, and the extra compute: the
token-steps all peers computed per generated token (their own counters, read after each generation).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bench import harness
from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints, launch

SPANS = [(0, 6, 5), (0, 3, 10), (3, 6, 10), (3, 6, 10)]  # (start, end, announced throughput): as bench.verify
PROMPT_TOKENS = 8
VOCAB = 250  # prompts are random ids in [3, VOCAB)
MODES = ("background", "strict")
WARMUP = 2  # generations per client and length before the timed ones


def prompt_source() -> harness.FreshPrompts:
    return harness.FreshPrompts(PROMPT_TOKENS, vocab=VOCAB)


def plan(args, prompts: harness.FreshPrompts) -> dict[int, list[dict]]:
    """Every prompt the run sends to the swarm: per length of ``--lengths``, ``WARMUP`` + ``--sessions``
    rounds, each one prompt per client mode of ``MODES``. None repeats."""
    return {tokens: [{mode: prompts.next() for mode in MODES} for _ in range(args.sessions + WARMUP)]
            for tokens in args.lengths}


def _peer_steps(model, peer_ids) -> int:
    """Token-steps every peer has computed so far (its info RPC's counters)."""
    core = model.swarm.core
    return sum(model.swarm.loop.run(core.transport.info(p), timeout=60)[0]["tokens_computed"] for p in peer_ids)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=6, help="generations per client and length (after 2 warm-up)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 128], help="new tokens per generation")
    return parser


def main() -> None:
    args = arguments().parse_args()
    path = checkpoints.tiny("llama", tempfile.mkdtemp(prefix="bench-strict-"))
    prompts = prompt_source()
    todo = plan(args, prompts)  # one fresh prompt per generation, never repeated
    procs, rows, results = [], [], {}
    try:
        dht = launch.start_dht()
        procs.append(dht)
        peers = [launch.start_peer(path, dht.maddrs, a, b, extra=["--throughput", str(t)], wait=False)
                 for a, b, t in SPANS]
        procs += peers
        for p in peers:
            p.wait_ready(180)
        peer_ids = [p.ready["peer_id"] for p in peers]
        clients = {mode: AutoDistributedModelForCausalLM.from_pretrained(path, dht.maddrs, verify_mode=mode,
                                                                        reputation_path=None)
                   for mode in MODES}
        try:
            for tokens in args.lengths:
                latency = {mode: [] for mode in clients}
                steps = {mode: [] for mode in clients}
                order = list(clients)
                for n, round_prompts in enumerate(todo[tokens]):
                    for mode in (order if n % 2 == 0 else order[::-1]):
                        model = clients[mode]
                        ids = prompts.sent(round_prompts[mode])
                        before = _peer_steps(model, peer_ids)
                        began = time.perf_counter()
                        model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
                        seconds = time.perf_counter() - began
                        model.swarm.wait_audits()
                        if n >= WARMUP:  # the first rounds: warm-up (routes, timings)
                            latency[mode].append(seconds / tokens)
                            steps[mode].append((_peer_steps(model, peer_ids) - before) / tokens)
                med = {mode: statistics.median(v) for mode, v in latency.items()}
                work = {mode: statistics.median(v) for mode, v in steps.items()}
                results[tokens] = {"latency_ms": {m: 1000 * v for m, v in med.items()}, "peer_steps_per_token": work}
                rows.append([tokens, 1000 * med["background"], 1000 * med["strict"], med["strict"] / med["background"],
                             work["background"], work["strict"], work["strict"] / work["background"]])
        finally:
            for model in clients.values():
                model.swarm.shutdown()
    finally:
        for p in reversed(procs):
            p.stop()
    print(harness.table(["new tokens", "default ms/token", "strict ms/token", "strict / default",
                         "default peer steps/token", "strict peer steps/token", "compute ratio"], rows))
    print("\ntarget: strict <= 1.3x default at 128 tokens")
    print(f"wrote {harness.write_results('strict', {'lengths': results, 'prompts': prompts.summary()}, args)}")


if __name__ == "__main__":
    main()
