"""Memory benchmark: each peer's resident memory next to the bytes of the block weights it serves.

With ``--quant none,int8,nf4``: the same blocks served in each weight format (a random Llama of ~330M
parameters unless --model-dir), each peer's resident memory and weight bytes against the float16 size
of its blocks, and per-token latency through the swarm against local transformers loaded with the
same quantization, measured in the same run.

A DHT node and 3 peers of SmolLM2-135M-Instruct on loopback, once per ``--dtypes`` entry. RSS is read
from /proc/<pid>/status (VmRSS) for the peer's own process, and summed over its process group (its
hivemind DHT child and p2pd daemon) for the whole footprint; once when the peers are ready, and again
after a generation (``--prompt-tokens`` + ``--new-tokens``, so the KV caches have been used). The
runtime baseline is a fresh interpreter that imported what a peer imports, with no weights. Each
swarm's generation has a prompt of its own (peers keep recent histories); ``plan`` lists them.

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


def plan(args, prompts: harness.FreshPrompts) -> dict[str, torch.Tensor]:
    """Every prompt the run sends to the swarm: one per dtype (or, with --quant, per weight format), each
    generated once locally (--quant) and once through that format's swarm. None repeats."""
    return {name: prompts.next() for name in (args.quant.split(",") if args.quant else args.dtypes)}


def measure(args, model_dir, spans, prompts: harness.FreshPrompts, ids, pad, dtype: str, runtime: int) -> list[dict]:
    rows = []
    with harness.BenchSwarm(model_dir, spans, extra=["--dtype", dtype]) as swarm:
        ready = {p.pid: (rss_bytes(p.pid), group_rss_bytes(p.pid)) for p in swarm.peers}
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None)
        try:
            model.generate(prompts.sent(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=pad)
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


QUANT_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)


def quant_model(log) -> str:
    """A random Llama of ~330M parameters (268M in its 16 blocks), built once into the swarmllm cache."""
    path = os.path.join(checkpoints.DEFAULT_CACHE, "bench-llama-330m")
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"building a random {QUANT_MODEL['num_hidden_layers']}-block Llama in {path} (once)")
        checkpoints.tiny("llama", path + ".tmp", seed=0, **QUANT_MODEL)
        os.replace(path + ".tmp", path)
    return path


_LOAD_CODE = """
import sys, torch
torch.set_num_threads(1)
from peer.blocks import BlockRunner
def rss():
    return sum(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(('RssAnon:', 'RssFile:'))) * 1024
before = rss()
runner = BlockRunner(sys.argv[1], 0, int(sys.argv[3]), quant=sys.argv[2])
print(rss() - before, runner.weight_bytes)
"""


def resident_per_block(model_dir: str, q: str, blocks: int) -> tuple[float, int]:
    """(resident bytes one more block costs, its weight bytes): RSS growth of a fresh process loading
    1 block and ``blocks`` blocks in format ``q``; the difference over ``blocks - 1`` leaves out what
    does not grow with blocks (the loading machinery)."""
    grown = []
    for n in (1, blocks):
        done = subprocess.run([sys.executable, "-c", _LOAD_CODE, model_dir, q, str(n)], capture_output=True,
                              text=True, timeout=600, check=True)
        grown.append([int(x) for x in done.stdout.split()[-2:]])
    (rss_1, w_1), (rss_n, w_n) = grown
    return (rss_n - rss_1) / (blocks - 1), (w_n - w_1) // (blocks - 1)


def measure_quant(args, model_dir: str, spans, prompts: harness.FreshPrompts, ids: torch.Tensor, q: str,
                  runtime: int) -> list[dict]:
    """One swarm of peers in format ``q``: memory per peer, and per-token latency against local."""
    from transformers import AutoModelForCausalLM

    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 quantization_config=quant.quantization_config(q, torch.float32))
    clock = harness.TokenClock()
    local.generate(ids, logits_processor=[clock], **gen)
    local_ms = 1000 * harness.median(clock.per_token)
    del local
    rows = []
    extra = ["--quant", q, "--num-threads", str(args.threads)]
    with harness.BenchSwarm(model_dir, spans, extra=extra) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None,
                                                                formats=[f"float32/{q}"])
        try:
            clock = harness.TokenClock()
            model.generate(prompts.sent(ids), logits_processor=[clock], **gen)
            swarm_ms = 1000 * harness.median(clock.per_token)
            route = model.swarm.route()
            stats = [model.swarm.loop.run(model.swarm.core.transport.info(h.peer_id, timeout=10))[0] for h in route]
        finally:
            model.swarm.shutdown()
        for p, (a, b), st in zip(swarm.peers, spans, sorted(stats, key=lambda st: st["start"])):
            rss = rss_bytes(p.pid)
            fp16 = 2 * st["num_parameters"]
            rows.append({"quant": q, "blocks": [a, b], "num_parameters": st["num_parameters"],
                         "fp16_bytes": fp16, "weight_bytes": st["weight_bytes"], "rss_bytes": rss,
                         "rss_anon_bytes": rss_bytes(p.pid, "RssAnon"), "rss_file_bytes": rss_bytes(p.pid, "RssFile"),
                         "resident_bytes": rss - runtime, "weights_over_fp16": st["weight_bytes"] / fp16,
                         "resident_over_fp16": (rss - runtime) / fp16,
                         "swarm_ms_per_token": swarm_ms, "local_ms_per_token": local_ms})
    return rows


def _one_block(config):
    """Block 0 of the model, built on the meta device (for its parameter count)."""
    from transformers import AutoModel

    with torch.device("meta"):
        return layout.find_blocks(AutoModel.from_config(config))[1][0]


def quant_main(args) -> None:
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or quant_model(_say)
    config = layout.load_config(model_dir)
    spans = harness.split_blocks(config.num_hidden_layers, args.peers)
    prompts = harness.FreshPrompts(args.prompt_tokens, vocab=config.vocab_size)
    todo = plan(args, prompts)
    runtime = runtime_rss_bytes()
    rows, marginal = [], []
    fp16_block = 2 * sum(p.numel() for p in _one_block(config).parameters())
    for q in args.quant.split(","):
        _say(f"{q}: resident memory per block (1 and {args.marginal_blocks} blocks loaded in fresh processes)")
        per_block, weights = resident_per_block(model_dir, q, args.marginal_blocks)
        marginal.append({"quant": q, "resident_per_block_bytes": per_block, "weight_bytes_per_block": weights,
                         "fp16_bytes_per_block": fp16_block, "resident_over_fp16": per_block / fp16_block})
        _say(f"{q}: local transformers, then a DHT node and {len(spans)} peers")
        rows += measure_quant(args, model_dir, spans, prompts, todo[q], q, runtime)
    mib = 2**20
    print(harness.table(
        ["quant", "fp16 MiB per block", "weights MiB per block", "resident MiB per block", "resident / fp16"],
        [[m["quant"], m["fp16_bytes_per_block"] / mib, m["weight_bytes_per_block"] / mib,
          m["resident_per_block_bytes"] / mib, f"{m['resident_over_fp16']:.3f}"] for m in marginal]))
    print()
    print(harness.table(
        ["quant", "blocks", "params (M)", "fp16 MiB", "weights MiB", "weights / fp16", "RSS MiB",
         "RSS - runtime MiB", "(RSS - runtime) / fp16", "swarm ms/token", "local ms/token", "swarm / local"],
        [[r["quant"], f"[{r['blocks'][0]}, {r['blocks'][1]})", r["num_parameters"] / 1e6, r["fp16_bytes"] / mib,
          r["weight_bytes"] / mib, f"{r['weights_over_fp16']:.3f}", r["rss_bytes"] / mib, r["resident_bytes"] / mib,
          f"{r['resident_over_fp16']:.3f}", r["swarm_ms_per_token"], r["local_ms_per_token"],
          f"{r['swarm_ms_per_token'] / r['local_ms_per_token']:.2f}"] for r in rows]))
    print(f"\nruntime: a fresh interpreter that imported the peer's modules holds {runtime / mib:.0f} MiB with no "
          f"weights; targets: NF4 weights <= 0.30 x fp16, int8 <= 0.55 x fp16")
    path = harness.write_results("memory_quant", {"model_dir": model_dir, "spans": spans, "runtime_rss_bytes": runtime,
                                                  "per_block": marginal, "peers": rows,
                                                  "prompts": prompts.summary()}, args)
    print(f"\nwrote {path}")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct; with "
                                                          "--quant, a random ~330M-parameter Llama)")
    parser.add_argument("--quant", default=None, metavar="Q[,Q...]",
                        help="compare weight formats (none, int8, nf4) on the same blocks instead of dtypes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each peer")
    parser.add_argument("--marginal-blocks", type=int, default=6,
                        help="with --quant: resident memory per block = RSS(this many blocks) - RSS(1), divided")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser


def parse(argv=None) -> argparse.Namespace:
    """The options; with --quant, prompt and new tokens default to 32 and 16."""
    parser = arguments()
    args = parser.parse_args(argv)
    if args.quant:
        if args.prompt_tokens == parser.get_default("prompt_tokens"):
            args.prompt_tokens = 32
        if args.new_tokens == parser.get_default("new_tokens"):
            args.new_tokens = 16
    return args


def main() -> None:
    args = parse()
    if args.quant:
        return quant_main(args)

    work = harness.workload(args, _say)
    model_dir, spans = work.model_dir, work.spans
    todo = plan(args, work.prompts)
    runtime = runtime_rss_bytes()
    rows = []
    for dtype in args.dtypes:
        _say(f"{dtype}: starting a DHT node and {len(spans)} peers")
        rows += measure(args, model_dir, spans, work.prompts, todo[dtype], work.pad, dtype, runtime)

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
                                            "peers": rows, "prompts": work.prompts.summary()}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
