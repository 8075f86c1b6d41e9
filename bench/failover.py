"""Failover benchmark: SIGKILL (or SIGSTOP) a peer at a random decode step; time fault -> next token.

Runs a local swarm (DHT + 2 peers for each half of a tiny 6-block Llama), generates 24 tokens per seed,
kills whichever peer serves a randomly chosen hop at a random step, and reports the recovery time
next to the median ordinary token time measured in the same run (the machine is shared and noisy).
Each seed's generation has a prompt of its own (peers keep recent histories); ``plan`` lists them.

    .venv/bin/python -m bench.failover [--seeds 10] [--signal kill|stop]
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from bench import harness
from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints, launch

SPANS = [(0, 3), (3, 6)]
PROMPT_TOKENS = 6
VOCAB = 250  # prompts are random ids in [3, VOCAB)


def prompt_source() -> harness.FreshPrompts:
    return harness.FreshPrompts(PROMPT_TOKENS, vocab=VOCAB)


def plan(args, prompts: harness.FreshPrompts) -> list:
    """Every prompt the run sends to the swarm: one per seed, in order. None repeats."""
    return [prompts.next() for _ in range(args.seeds)]


class OnStep(LogitsProcessor):
    def __init__(self, action):
        self.action, self.step, self.times = action, 0, []

    def __call__(self, input_ids, scores):
        self.times.append(time.monotonic())
        self.action(self.step)
        self.step += 1
        return scores


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--step-timeout", type=float, default=3.0)
    parser.add_argument("--signal", choices=["kill", "stop"], default="kill")
    return parser


def main() -> None:
    # Long on purpose: a benchmark script, its phases in the order the README reports them.
    args = arguments().parse_args()
    prompts = prompt_source()
    todo = plan(args, prompts)
    path = checkpoints.tiny("llama", tempfile.mkdtemp(prefix="bench-failover-"))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    procs: list[launch.SwarmProcess] = []
    by_id: dict[str, launch.SwarmProcess] = {}

    def add(spans):
        started = [launch.start_peer(path, dht.maddrs, a, b, wait=False) for a, b in spans]
        procs.extend(started)
        for p in started:
            p.wait_ready(180)
            by_id[p.ready["peer_id"]] = p

    try:
        dht = launch.start_dht()
        procs.append(dht)
        add(SPANS * 2)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, dht.maddrs, step_timeout=args.step_timeout,
                                                                refresh_period=1.0, ban_base=1.0)
        recoveries, normal, identical = [], [], 0
        try:
            for seed, ids in enumerate(todo):
                rng = random.Random(seed)
                kill_step, hop = rng.randint(2, 16), rng.randint(0, 1)
                killed = {}

                def kill(step):
                    if step == kill_step:
                        victim = by_id[model._generate_sessions[0].route[hop].peer_id]
                        victim.signal(signal.SIGKILL if args.signal == "kill" else signal.SIGSTOP)
                        killed["at"], killed["victim"] = time.monotonic(), victim

                watcher = OnStep(kill)
                out = model.generate(prompts.sent(ids), max_new_tokens=24, do_sample=False, pad_token_id=0,
                                     logits_processor=LogitsProcessorList([watcher]))
                identical += out.tolist() == local.generate(ids, max_new_tokens=24, do_sample=False,
                                                            pad_token_id=0).tolist()
                recoveries.append(watcher.times[kill_step + 1] - killed["at"])
                gaps = [b - a for a, b in zip(watcher.times, watcher.times[1:])]
                normal += gaps[:kill_step] + gaps[kill_step + 1:]
                if args.signal == "kill":
                    add([tuple(killed["victim"].ready["blocks"])])
                else:
                    killed["victim"].signal(signal.SIGCONT)
            retries = model.swarm.core.retries
        finally:
            model.swarm.shutdown()
    finally:
        for p in reversed(procs):
            p.stop()
    token = statistics.median(normal)
    median = statistics.median(recoveries)
    print("recoveries (ms):", [round(r * 1000) for r in recoveries])
    print(f"seeds: {args.seeds}, identical to local: {identical}/{args.seeds}, failovers: {retries}")
    print(f"prompts: {prompts.summary()}")
    print(f"ordinary token (median): {token * 1000:.1f} ms")
    print(f"recovery, SIG{args.signal.upper()} -> next token: median {median * 1000:.0f} ms, max {max(recoveries) * 1000:.0f} ms "
          f"({median / token:.1f}x an ordinary token)")


if __name__ == "__main__":
    main()
