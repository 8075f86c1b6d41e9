"""Memory benchmark: each peer's resident memory next to the bytes of the block weights it serves.

With ``--quant none,int8,nf4``: per weight format, a peer of 1 block and a peer of 5 blocks of a random
6-block Llama with 64 MiB float32 blocks (unless --model-dir), both after serving a generation (a fresh
prompt per format): what one more block costs in resident memory, (RSS of 5 blocks - RSS of 1) / 4,
against its weight bytes in that format, and per-token latency through the swarm against local
transformers loaded with the same quantization, measured in the same run.

A DHT node and 3 peers of SmolLM2-135M-Instruct on loopback, once per ``--dtypes`` entry. RSS is read
from /proc/<pid>/status (VmRSS) for the peer's own process, and summed over its process group (its
hivemind DHT child and p2pd daemon) for the whole footprint; once when the peers are ready, and again
after a generation (``--prompt-tokens`` + ``--new-tokens``, so the KV caches have been used). The
runtime baseline is a fresh interpreter that imported what a peer imports, with no weights.

    .venv/bin/python -m bench.memory [--dtypes float32 bfloat16]
    .venv/bin/python -m bench.memory --quant none,int8,nf4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from safetensors import safe_open

from bench import harness
from client import AutoDistributedModelForCausalLM
import layout
from peer import quant
from swarmllm import checkpoints

BLOCK_PREFIX = "model.layers."  # Llama-style checkpoints name block i's tensors model.layers.<i>.*


def _say(msg: str) -> None:
    print(f"[memory] {msg}", file=sys.stderr, flush=True)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or RssAnon, RssFile, ...) of one process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no {field} line (a zombie?)")


def group_rss_bytes(pgid: int) -> int:
    """Summed VmRSS of every process in process group ``pgid``, bytes."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == pgid:
                total += rss_bytes(int(entry))
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
    return total


def runtime_rss_bytes() -> int:
    """VmRSS of a fresh interpreter that has imported what a peer imports, and no weights, bytes."""
    code = ("import peer.server, torch, transformers, hivemind\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    return int(done.stdout.split()[-1]) * 1024


def block_weight_bytes(model_dir: str, start: int, end: int, dtype: torch.dtype) -> int:
    """Bytes of blocks [start, end)'s tensors once cast to ``dtype``, from the checkpoint's headers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, path in layout.checkpoint_files(model_dir).items():
        if not name.startswith(BLOCK_PREFIX) or not start <= int(name.split(".")[2]) < end:
            continue
        with safe_open(path, framework="pt") as f:
            numel = 1
            for d in f.get_slice(name).get_shape():
                numel *= d
        total += numel * itemsize
    return total


def measure(args, model_dir, spans, ids, pad, dtype: str, runtime: int) -> list[dict]:
    rows = []
    with harness.BenchSwarm(model_dir, spans, extra=["--dtype", dtype]) as swarm:
        ready = {p.pid: (rss_bytes(p.pid), group_rss_bytes(p.pid)) for p in swarm.peers}
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None)
        try:
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=pad)
        finally:
            model.swarm.shutdown()
        for p, (a, b) in zip(swarm.peers, spans):
            weights = block_weight_bytes(model_dir, a, b, getattr(torch, dtype))
            rss_ready, group_ready = ready[p.pid]
            rss_after = rss_bytes(p.pid)
            anon, file = rss_bytes(p.pid, "RssAnon"), rss_bytes(p.pid, "RssFile")
            rows.append({"dtype": dtype, "blocks": [a, b], "weights_bytes": weights,
                         "rss_ready_bytes": rss_ready, "rss_after_bytes": rss_after,
                         "rss_anon_after_bytes": anon, "rss_file_after_bytes": file,
                         "group_rss_ready_bytes": group_ready, "group_rss_after_bytes": group_rss_bytes(p.pid),
                         "rss_over_weights": rss_after / weights, "overhead_bytes": rss_after - weights,
                         "unexplained_bytes": rss_after - weights - runtime})
    return rows


QUANT_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
QUANT_SPANS = [(0, 1), (1, 6)]  # a peer of 1 block and one of 5: their difference / 4 is one more block's cost


def quant_model(log) -> str:
    """A random 6-block Llama with 64 MiB float32 blocks (16.8M parameters each), built once into the
    swarmllm cache."""
    path = os.path.join(checkpoints.DEFAULT_CACHE, "bench-llama-6x64m")
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"building a random {QUANT_MODEL['num_hidden_layers']}-block Llama in {path} (once)")
        checkpoints.tiny("llama", path + ".tmp", seed=0, **QUANT_MODEL)
        os.replace(path + ".tmp", path)
    return path


def fresh_prompt(vocab_size: int, tokens: int, seed: int) -> torch.Tensor:
    """(1, tokens) random ids, a different prompt per ``seed`` (no peer has kept its prefix)."""
    return torch.randint(3, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))


def measure_quant(args, model_dir: str, q: str, seed: int) -> dict:
    """Peers of 1 and 5 blocks in format ``q``, after serving a generation: what one more block costs
    in resident memory against its weight bytes, and per-token latency against local transformers."""
    from transformers import AutoModelForCausalLM

    config = layout.load_config(model_dir)
    ids = fresh_prompt(config.vocab_size, args.prompt_tokens, seed)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 quantization_config=quant.quantization_config(q, torch.float32))
    clock = harness.TokenClock()
    expected = local.generate(ids, logits_processor=[clock], **gen)
    local_ms = 1000 * harness.median(clock.per_token)
    del local
    extra = ["--quant", q, "--num-threads", str(args.threads)]
    with harness.BenchSwarm(model_dir, QUANT_SPANS, extra=extra) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None,
                                                                formats=[f"float32/{q}"])
        try:
            clock = harness.TokenClock()
            got = model.generate(ids, logits_processor=[clock], **gen)
            swarm_ms = 1000 * harness.median(clock.per_token)
            stats = {st["start"]: st for st in (model.swarm.loop.run(model.swarm.core.transport.info(h.peer_id,
                                                                                                    timeout=10))[0]
                                                for h in model.swarm.route())}
        finally:
            model.swarm.shutdown()
        peers = []
        for p, (a, b) in zip(swarm.peers, QUANT_SPANS):
            peers.append({"blocks": [a, b], "weight_bytes": stats[a]["weight_bytes"], "rss_bytes": rss_bytes(p.pid),
                          "rss_anon_bytes": rss_bytes(p.pid, "RssAnon"), "rss_file_bytes": rss_bytes(p.pid, "RssFile"),
                          "peak_rss_bytes": rss_bytes(p.pid, "VmHWM")})
    small, big = peers
    more = (big["blocks"][1] - big["blocks"][0]) - (small["blocks"][1] - small["blocks"][0])
    per_block = (big["rss_bytes"] - small["rss_bytes"]) / more
    weights = (big["weight_bytes"] - small["weight_bytes"]) / more
    return {"quant": q, "peers": peers, "resident_per_block_bytes": per_block, "weight_bytes_per_block": weights,
            "resident_over_weights": per_block / weights, "target": TARGETS[q],
            "anon_per_block_bytes": (big["rss_anon_bytes"] - small["rss_anon_bytes"]) / more,
            "file_per_block_bytes": (big["rss_file_bytes"] - small["rss_file_bytes"]) / more,
            "swarm_ms_per_token": swarm_ms, "local_ms_per_token": local_ms,
            "equals_local": bool(torch.equal(got, expected))}


TARGETS = {"none": 1.05, "int8": 1.3, "nf4": 1.3}  # resident per block / its weight bytes, after serving


def quant_main(args) -> None:
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or quant_model(_say)
    rows = []
    for i, q in enumerate(args.quant.split(",")):
        _say(f"{q}: local transformers, then a DHT node and peers of blocks {QUANT_SPANS}")
        rows.append(measure_quant(args, model_dir, q, seed=i))
    mib = 2**20
    print(harness.table(
        ["quant", "weights MiB per block", "resident MiB per block", "resident / weights", "target",
         "anon MiB per block", "file MiB per block", "RSS 1 block MiB", "RSS 5 blocks MiB", "peak RSS 5 blocks MiB",
         "swarm ms/token", "local ms/token", "equals local"],
        [[r["quant"], r["weight_bytes_per_block"] / mib, r["resident_per_block_bytes"] / mib,
          f"{r['resident_over_weights']:.3f}", f"<= {r['target']}", r["anon_per_block_bytes"] / mib,
          r["file_per_block_bytes"] / mib, r["peers"][0]["rss_bytes"] / mib, r["peers"][1]["rss_bytes"] / mib,
          r["peers"][1]["peak_rss_bytes"] / mib, r["swarm_ms_per_token"], r["local_ms_per_token"],
          "yes" if r["equals_local"] else "NO"] for r in rows]))
    path = harness.write_results("memory_quant", {"model_dir": model_dir, "spans": QUANT_SPANS, "formats": rows}, args)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct; with "
                                                          "--quant, a random ~330M-parameter Llama)")
    parser.add_argument("--quant", default=None, metavar="Q[,Q...]",
                        help="compare weight formats (none, int8, nf4) on the same blocks instead of dtypes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each peer")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.quant:
        if args.prompt_tokens == parser.get_default("prompt_tokens"):
            args.prompt_tokens = 32
        if args.new_tokens == parser.get_default("new_tokens"):
            args.new_tokens = 16
        return quant_main(args)

    work = harness.workload(args, _say)
    model_dir, spans, ids = work.model_dir, work.spans, work.ids
    runtime = runtime_rss_bytes()
    rows = []
    for dtype in args.dtypes:
        _say(f"{dtype}: starting a DHT node and {len(spans)} peers")
        rows += measure(args, model_dir, spans, ids, work.pad, dtype, runtime)

    mib = 2**20
    print(harness.table(
        ["dtype", "blocks", "weights MiB", "RSS ready MiB", "RSS after generate MiB", "RSS / weights",
         "RSS - weights MiB", "RSS - weights - runtime MiB", "group RSS MiB (+DHT child, p2pd)"],
        [[r["dtype"], f"[{r['blocks'][0]}, {r['blocks'][1]})", r["weights_bytes"] / mib, r["rss_ready_bytes"] / mib,
          r["rss_after_bytes"] / mib, f"{r['rss_over_weights']:.2f}", r["overhead_bytes"] / mib,
          r["unexplained_bytes"] / mib, r["group_rss_after_bytes"] / mib] for r in rows]))
    print(f"\nruntime: a fresh interpreter that imported the peer's modules (torch, transformers, hivemind) "
          f"holds {runtime / mib:.0f} MiB with no weights")
    path = harness.write_results("memory", {"model_dir": model_dir, "spans": spans, "runtime_rss_bytes": runtime,
                                            "peers": rows}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
