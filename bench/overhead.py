"""Overhead benchmark: where a decode step's time goes, per hop, against a bare hivemind stream of the same bytes.

A random Llama (``--size``: 110m = 12 blocks of width 768, 220m = 16 of 1024; fixed seed) or ``--model-dir``
on ``--peers`` loopback peers, and local transformers, measured in the same run: ``--trials`` greedy
generations each, alternating, every one on a fresh prompt (prompt i is used once locally and once
through the swarm, never twice on the swarm: peers keep recent histories). Then:

- the peers' own phase timings (their statistics' ``phases``, wire/phases.py): compute, and every other
  phase (decode, queue, validate, reuse, compute wait, handback, encode, sign, reply: the peer's software
  time per step); ``push`` is the push RPC until the next peer acknowledged it;
- the client's (handoff, prepare, wait, decode, model);
- a bare hivemind stream echo between this process and a separate echo process (its own p2pd): the
  same message a decode step sends (hidden (1, 1, width) float32, position ids, mask), sent and echoed
  back unchanged, no decoding; half its round trip is one bare message.

    per-token time = local time (compute + head) + software + transport
    transport      = (k + 1) messages x one bare message (push mode)
    software / hop = (per-token - local - transport) / k

    .venv/bin/python -m bench.overhead [--size 110m|220m] [--trials 8] [--new-tokens 32] [--threads 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from bench import harness
from client import AutoDistributedModelForCausalLM
from dht.ready import ready_line
from swarmllm import checkpoints, launch
import wire

SIZES = {  # random Llamas: (blocks, width, MLP width, heads, kv heads)
    "110m": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=4),
    "220m": dict(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=4),
}
ECHO_RPC = "swarmllm.bench.echo"
PEER_SOFTWARE = ("decode", "queue", "validate", "reuse", "compute_wait", "handback", "encode", "sign", "reply")
CLIENT_SOFTWARE = ("handoff", "prepare", "decode")
TARGET_PEER_MS, TARGET_CLIENT_MS = 1.0, 2.0


def _say(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


def random_llama(size: str) -> str:
    path = os.path.join(checkpoints.DEFAULT_CACHE, f"bench-llama-{size}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        _say(f"building a random {size} Llama in {path} (once)")
        checkpoints.tiny("llama", path, seed=0, vocab_size=32000, max_position_embeddings=2048, **SIZES[size])
    return path


def plan(args: argparse.Namespace, prompts: harness.FreshPrompts) -> dict:
    """Every prompt the run uses: a short warm-up for local and one for the swarm, then per trial one
    prompt that local transformers and then the swarm generate from (the swarm sees each once)."""
    warm = harness.FreshPrompts(8, vocab=prompts.vocab, seed=prompts_seed(args) + 1)
    return {"local_warmup": warm.next(), "swarm_warmup": warm.next(),
            "trials": [prompts.next() for _ in range(args.trials)]}


def prompts_seed(args: argparse.Namespace) -> int:
    return 25 + args.trials


def prompt_source(args: argparse.Namespace, vocab: int) -> harness.FreshPrompts:
    return harness.FreshPrompts(args.prompt_tokens, vocab=vocab, seed=prompts_seed(args))


# ---- the bare transport -------------------------------------------------------------------------------

async def _serve_echo() -> None:
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2

    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_ipfs=False, nat_port_map=False)

    async def echo(requests, context):
        async for request in requests:
            yield runtime_pb2.ExpertResponse(metadata=request.metadata, tensors=request.tensors)

    async def unary(request, context):
        return runtime_pb2.ExpertResponse(metadata=request.metadata, tensors=request.tensors)

    await p2p.add_protobuf_handler(ECHO_RPC, echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    await p2p.add_protobuf_handler(ECHO_RPC + ".unary", unary, runtime_pb2.ExpertRequest)
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    print(ready_line("echo", peer_id=p2p.peer_id.to_base58(), maddrs=maddrs), flush=True)
    await asyncio.Event().wait()


async def _echo_times(peer_id: str, maddrs: list[str], width: int, length: int, messages: int) -> dict:
    """Round trips (seconds) of ``messages`` decode-step messages over one stream, and as unary calls."""
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import runtime_pb2

    from dht.addressing import dial

    p2p = await P2P.create(use_ipfs=False, nat_port_map=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        await dial(p2p, peer_id, maddrs, 10)
        target = PeerID.from_base58(peer_id)
        message = wire.request({"op": "step", "session_id": "x" * 32, "offset": length},
                               [torch.randn(1, 1, width), torch.tensor([[length]]), torch.ones(1, length + 1)])
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await queue.get()) is not None:
                yield item

        replies = await p2p.iterate_protobuf_handler(target, ECHO_RPC, requests(), runtime_pb2.ExpertResponse)
        stream = []
        for _ in range(messages):
            began = time.perf_counter()
            queue.put_nowait(message)
            await replies.__anext__()
            stream.append(time.perf_counter() - began)
        queue.put_nowait(None)
        async for _ in replies:
            pass
        unary = []
        for _ in range(messages):
            began = time.perf_counter()
            await p2p.call_protobuf_handler(target, ECHO_RPC + ".unary", message, runtime_pb2.ExpertResponse)
            unary.append(time.perf_counter() - began)
        return {"stream_rtt_s": stream, "unary_rtt_s": unary, "message_bytes": message.ByteSize()}
    finally:
        await p2p.shutdown()


def bare_transport(width: int, length: int, messages: int) -> dict:
    server = launch.SwarmProcess("echo", [sys.executable, "-m", "bench.overhead", "--serve-echo"])
    try:
        ready = server.wait_ready(60)
        times = asyncio.run(_echo_times(ready["peer_id"], ready["maddrs"], width, length, messages))
    finally:
        server.stop()
    warm = {k: v[messages // 10:] if isinstance(v, list) else v for k, v in times.items()}  # first tenth: warm-up
    return {"stream_rtt_ms": 1e3 * statistics.median(warm["stream_rtt_s"]),
            "unary_rtt_ms": 1e3 * statistics.median(warm["unary_rtt_s"]),
            "message_bytes": times["message_bytes"], "messages": messages}


# ---- the swarm ------------------------------------------------------------------------------------------

def _generate(model, ids: torch.Tensor, new_tokens: int, on_first=None) -> tuple[float, torch.Tensor, object]:
    """(median seconds per decoded token, the tokens, what ``on_first`` returned at the first token)."""
    clock = harness.TokenClock(on_first)
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    return statistics.median(clock.per_token), out, clock.seen


def _peer_phases(model) -> list[dict]:
    core = model.swarm.core

    async def read():
        await core.refresh()
        out = []
        for r in sorted(core.records, key=lambda r: r.start):
            meta, _ = await core.transport.info(r.peer_id)
            out.append({"blocks": [r.start, r.end], "phases": meta.get("phases", {})})
        return out
    return model.swarm.loop.run(read())


def _p50(phases: dict, name: str) -> float:
    return phases.get(name, {}).get("p50_ms", 0.0)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--size", choices=sorted(SIZES), default="110m")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--echo-messages", type=int, default=400)
    return parser


def main() -> None:
    args = arguments().parse_args()
    if args.serve_echo:
        asyncio.run(_serve_echo())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or random_llama(args.size)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = local.config
    spans = harness.split_blocks(config.num_hidden_layers, args.peers)
    prompts = prompt_source(args, config.vocab_size)
    todo = plan(args, prompts)  # fresh prompts: peers keep recent histories, a repeated prompt is a cache hit
    _generate(local, todo["local_warmup"], 4)
    extra = ["--num-threads", str(args.threads)] if args.threads else []
    rows = []
    _say(f"{model_dir}: {len(spans)} peers {spans}, {args.trials} trials of {args.new_tokens} tokens")
    with harness.BenchSwarm(model_dir, spans, extra=extra) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None)
        try:
            _generate(model, todo["swarm_warmup"], 4)  # warm-up: routes planned, RTTs measured
            for trial in range(args.trials):
                ids = todo["trials"][trial]
                local_s, reference, _ = _generate(local, ids, args.new_tokens)
                swarm_s, out, route = _generate(model, prompts.sent(ids), args.new_tokens,
                                                on_first=lambda: list(model._generate_sessions[0].route))
                hops = len(route)
                rows.append({"trial": trial, "local_ms": 1e3 * local_s, "swarm_ms": 1e3 * swarm_s, "hops": hops,
                             "identical": torch.equal(out, reference)})
                _say(f"trial {trial + 1}/{args.trials}: local {1e3 * local_s:.1f} ms/token, swarm {1e3 * swarm_s:.1f}")
            peers = _peer_phases(model)
            client = model.swarm.core.phases.summary()
        finally:
            model.swarm.shutdown()
    _say("bare transport: a hivemind stream echo of a decode step's message")
    bare = bare_transport(config.hidden_size, args.prompt_tokens + args.new_tokens // 2, args.echo_messages)

    local_ms = statistics.median(r["local_ms"] for r in rows)
    swarm_ms = statistics.median(r["swarm_ms"] for r in rows)
    one_way = bare["stream_rtt_ms"] / 2
    transport = (hops + 1) * one_way
    per_hop = (swarm_ms - local_ms - transport) / hops
    peer_rows = []
    for p in peers:
        software = sum(_p50(p["phases"], n) for n in PEER_SOFTWARE)
        peer_rows.append({**p, "compute_ms": _p50(p["phases"], "compute"), "software_ms": software,
                          "push_ms": _p50(p["phases"], "push")})
    client_software = sum(_p50(client, n) for n in CLIENT_SOFTWARE)
    summary = {"local_ms": local_ms, "swarm_ms": swarm_ms, "ratio": swarm_ms / local_ms, "hops": hops,
               "bare_stream_rtt_ms": bare["stream_rtt_ms"], "bare_unary_rtt_ms": bare["unary_rtt_ms"],
               "transport_ms": transport, "software_per_hop_ms": per_hop,
               "peer_software_p50_ms": [r["software_ms"] for r in peer_rows], "client_software_p50_ms": client_software,
               "client_wait_p50_ms": _p50(client, "wait"), "client_model_p50_ms": _p50(client, "model"),
               "identical": all(r["identical"] for r in rows)}

    print(harness.table(["", "ms"], [
        ["local per token", local_ms], ["swarm per token", swarm_ms], ["ratio", f"{swarm_ms / local_ms:.2f}"],
        [f"bare transport: {hops + 1} messages x {one_way:.3f} ms", transport],
        ["software per hop (per token - local - transport) / k", per_hop],
        ["client software p50 (handoff + prepare + decode)", client_software],
        ["client model between steps p50", _p50(client, "model")]]))
    print()
    print(harness.table(["peer", "compute p50", "software p50", *PEER_SOFTWARE, "push"], [
        [f"[{r['blocks'][0]}, {r['blocks'][1]})", r["compute_ms"], r["software_ms"],
         *[_p50(r["phases"], n) for n in PEER_SOFTWARE], r["push_ms"]] for r in peer_rows]))
    print()
    print(harness.table(["client phase", "p50 ms", "p90 ms"],
                        [[n, _p50(client, n), client.get(n, {}).get("p90_ms", 0.0)] for n in client]))
    print(f"\ntargets: peer software p50 <= {TARGET_PEER_MS} ms per step, client software <= {TARGET_CLIENT_MS} ms "
          f"per token; same tokens as local: {summary['identical']}")
    name = f"overhead-{args.size}" if not args.model_dir else "overhead"
    path = harness.write_results(name, {"model_dir": model_dir, "spans": spans, "summary": summary, "trials": rows,
                                        "prompts": prompts.summary(),
                                        "peers": peer_rows, "client_phases": client, "bare": bare}, args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
