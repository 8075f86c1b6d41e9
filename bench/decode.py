"""Decode benchmark: per-token latency and time to first token, local transformers vs a 3-peer swarm of
the same checkpoint, on loopback and with a WAN delay in front of every peer.

For each network (loopback, then ``--delay-ms`` one way per link through bench/wanproxy.py) a fresh
swarm (DHT + one peer per span) serves SmolLM2-135M-Instruct in float32; each trial generates
``--new-tokens`` greedy tokens through the swarm once per client mode (peers push to each other, or the
client relays every hop: both when this client has the ``push`` option), each after its own fresh
``--prompt-tokens`` prompt (peers keep recent histories: a repeated prompt would time cache hits), and
locally on that same prompt just before (same work). Time to first token includes opening the session,
as a user sees it. ``plan`` lists every prompt the run sends to the swarm.

    .venv/bin/python -m bench.decode [--trials 3] [--new-tokens 32] [--prompt-tokens 256] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from bench import harness
from client import AutoDistributedModelForCausalLM

TARGET_LOOPBACK = 1.3  # swarm per-token latency / local, loopback (issue 25; 1.15 is where we are going)
TARGET_WAN = 1.05  # (issue 25) swarm per-token latency / (local + (k + 1) x one-way delay)
TARGET_TTFT = 1.3  # time to first token / local, loopback


def _say(msg: str) -> None:
    print(f"[decode] {msg}", file=sys.stderr, flush=True)


def _generate(model, ids, new_tokens: int, pad: int, on_first=None) -> tuple[harness.TokenClock, torch.Tensor]:
    clock = harness.TokenClock(on_first)
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
    return clock, out


def _run(kind: str, clock: harness.TokenClock, **extra) -> dict:
    return {"kind": kind, "first_token_s": clock.first_token, "per_token_s": harness.median(clock.per_token), **extra}


def modes() -> list[bool | None]:
    """The client modes measured: push (True) and relay (False) when the client has ``push``."""
    return [True, False] if harness.supports("push") else [None]


def networks(args) -> dict[str, float | None]:
    """Network name -> one-way delay (ms; None: loopback), in the order they run."""
    nets = {} if args.no_loopback else {"loopback": None}
    if not args.no_wan:
        nets[f"{args.delay_ms:g} ms links"] = args.delay_ms
    return nets


def plan(args, prompts: harness.FreshPrompts) -> dict[str, dict]:
    """Every prompt the run sends to the swarm, per network: ``warmup``, an 8-token prompt per client mode;
    ``trials``, per trial one ``--prompt-tokens`` prompt per mode (in ``modes()`` order). None repeats."""
    return {network: {"warmup": [prompts.next(8) for _ in modes()],
                      "trials": [[prompts.next() for _ in modes()] for _ in range(args.trials)]}
            for network in networks(args)}


def measure_network(args, model_dir, spans, prompts: harness.FreshPrompts, todo: dict, pad, local, network: str,
                    delay_ms: float | None) -> list[dict]:
    """Every trial, each client mode: local, then the swarm, on the trial's prompt for that mode (``todo``,
    this network's part of ``plan``); fresh swarm, clients made once."""
    runs = []
    _say(f"{network}: starting a DHT node and {len(spans)} peers" + (f" behind {delay_ms} ms proxies" if delay_ms else ""))
    with harness.BenchSwarm(model_dir, spans, delay_ms=delay_ms, extra=["--num-threads", str(args.threads)]) as swarm:
        clients = {}
        try:
            for push, warm in zip(modes(), todo["warmup"]):
                opts = harness.client_options(push=push, wire_dtype=args.wire_dtype)
                clients[push] = AutoDistributedModelForCausalLM.from_pretrained(
                    model_dir, swarm.initial_peers, reputation_path=None, **opts)
                _generate(clients[push], prompts.sent(warm), 4, pad)  # warm-up: RTTs measured, routes planned
            for trial, trial_prompts in enumerate(todo["trials"]):
                for (push, model), ids in zip(clients.items(), trial_prompts):
                    clock, reference = _generate(local, ids, args.new_tokens, pad)
                    runs.append(_run("local", clock, network=network, trial=trial))
                    clock, out = _generate(model, prompts.sent(ids), args.new_tokens, pad,
                                           on_first=lambda m=model: list(m._generate_sessions[0].route))
                    hops = len(clock.seen)
                    used_push = bool(model.swarm.cfg.push) if harness.supports("push") else False
                    runs.append(_run("swarm", clock, network=network, trial=trial, delay_ms=delay_ms or 0.0,
                                     push=used_push, hops=hops,
                                     messages=harness.critical_path_messages(hops, used_push),
                                     identical=torch.equal(out, reference)))
                _say(f"{network}: trial {trial + 1}/{args.trials} done")
        finally:
            for model in clients.values():
                model.swarm.shutdown()
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (network, mode); each compared with the local runs interleaved with it (same swarm,
    same minutes of a shared machine)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["kind"] == "swarm":
            groups.setdefault((r["network"], r["push"]), []).append(r)
    rows = []
    for (network, push), rs in groups.items():
        local = [r for r in runs if r["kind"] == "local" and r["network"] == network]
        local_tok = harness.median([r["per_token_s"] for r in local])
        local_first = harness.median([r["first_token_s"] for r in local])
        hops, delay = rs[0]["hops"], rs[0]["delay_ms"] / 1000
        tok = harness.median([r["per_token_s"] for r in rs])
        first = harness.median([r["first_token_s"] for r in rs])
        if delay:
            bound = local_tok + (hops + 1) * delay
            target, limit = tok / bound, TARGET_WAN
        else:
            bound, target, limit = local_tok, tok / local_tok, TARGET_LOOPBACK
        rows.append({
            "network": network, "push": push, "hops": hops, "messages": rs[0]["messages"],
            "per_token_ms": tok * 1000, "local_per_token_ms": local_tok * 1000,
            "ideal_ms": bound * 1000, "per_token_vs_target_base": target, "per_token_limit": limit,
            "per_token_met": target <= limit,
            "first_token_ms": first * 1000, "local_first_token_ms": local_first * 1000,
            "first_token_ratio": first / local_first,
            "first_token_met": (first / local_first <= TARGET_TTFT) if not delay else None,
            "identical": all(r["identical"] for r in rs), "trials": len(rs),
        })
    return rows


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, trials=3, prompt_tokens=256, delay_ms=25.0,
                          delay_help="one-way delay per link for the WAN run")
    parser.add_argument("--no-loopback", action="store_true")
    parser.add_argument("--no-wan", action="store_true")
    return parser


def main() -> None:
    args = arguments().parse_args()
    work = harness.workload(args, _say)
    model_dir, spans, pad = work.model_dir, work.spans, work.pad
    todo = plan(args, work.prompts)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _generate(local, work.prompts.next(8), 4, pad)  # warm-up (local only)
    runs = []
    for network, delay_ms in networks(args).items():
        runs += measure_network(args, model_dir, spans, work.prompts, todo[network], pad, local, network, delay_ms)
    rows = summarize(runs)

    print(harness.table(
        ["network", "mode", "hops k", "msgs/token", "swarm ms/token", "local ms/token", "ratio", "target",
         "TTFT ms", "local TTFT ms", "TTFT ratio", "same tokens"],
        [[r["network"], "push" if r["push"] else "client relays", r["hops"], r["messages"], r["per_token_ms"],
          r["local_per_token_ms"],
          f"{r['per_token_vs_target_base']:.2f}" + ("" if r["network"] == "loopback" else " of local+(k+1)d"),
          f"<= {r['per_token_limit']} {'met' if r['per_token_met'] else 'MISSED'}",
          r["first_token_ms"], r["local_first_token_ms"],
          f"{r['first_token_ratio']:.2f}" + ("" if r["first_token_met"] is None else
                                            f" (<= {TARGET_TTFT} {'met' if r['first_token_met'] else 'MISSED'})"),
          r["identical"]] for r in rows]))
    path = harness.write_results(harness.results_name("decode", args),
                                 {"model_dir": model_dir, "spans": spans, "prompts": work.prompts.summary(),
                                  "summary": rows, "runs": runs}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
