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
    .venv/bin/python -m bench.memory --self-sized [--quant nf4 --max-memory 1200MiB --cache-tokens 8192]

With ``--self-sized``: a peer started with ``--max-memory`` and no ``--blocks`` (it takes as many blocks
as fit) serves generations with long fresh prompts; its peak RSS (VmHWM) must stay under --max-memory.
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
from swarmllm import checkpoints, launch

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


def plan(args, prompts: harness.FreshPrompts | None = None, vocab_size: int = 32000) -> list[torch.Tensor]:
    """Every prompt a run sends to a swarm. Dtypes: one per dtype from ``prompts`` (a new swarm each).
    --quant: per format i, --repeats x len(QUANT_LAYOUTS) prompts of seed 1000 i + j (a new swarm each).
    --self-sized: --generations prompts of seed 7000 + i. None repeats (tests/test_bench_prompts.py)."""
    if args.self_sized:
        return [fresh_prompt(vocab_size, args.prompt_tokens, 7000 + i) for i in range(args.generations)]
    if args.quant:
        return [fresh_prompt(vocab_size, args.prompt_tokens, 1000 * seed + i)
                for seed, _ in enumerate(args.quant.split(",")) for i in range(args.repeats * len(QUANT_LAYOUTS))]
    return [prompts.next() for _ in args.dtypes]


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


QUANT_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
# Per format, a peer of 1 block and one of 5, in both orders (the first hop's and the last hop's own
# overheads differ by a few MiB, which the two orders cancel): one more block = (RSS5 - RSS1) / 4.
QUANT_LAYOUTS = [[(0, 1), (1, 6)], [(0, 5), (5, 6)]]


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


def serve_and_read(model_dir: str, spans, q: str, ids: torch.Tensor, gen: dict, threads: int) -> tuple[dict, list]:
    """A DHT node and one peer per span in format ``q``; after one generation of ``ids``: each peer's
    memory, the tokens and the per-token times."""
    extra = ["--quant", q, "--num-threads", str(threads)]
    with harness.BenchSwarm(model_dir, spans, extra=extra) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None,
                                                                formats=[f"float32/{q}"])
        try:
            clock = harness.TokenClock()
            out = model.generate(ids, logits_processor=[clock], **gen)
            stats = {st["start"]: st for st in (model.swarm.loop.run(model.swarm.core.transport.info(h.peer_id,
                                                                                                    timeout=10))[0]
                                                for h in model.swarm.route())}
        finally:
            model.swarm.shutdown()
        peers = {b - a: {"blocks": [a, b], "weight_bytes": stats[a]["weight_bytes"], "rss_bytes": rss_bytes(p.pid),
                         "rss_anon_bytes": rss_bytes(p.pid, "RssAnon"), "rss_file_bytes": rss_bytes(p.pid, "RssFile"),
                         "peak_rss_bytes": rss_bytes(p.pid, "VmHWM")}
                 for p, (a, b) in zip(swarm.peers, spans)}
    return peers, {"tokens": out, "per_token": clock.per_token}


def measure_quant(args, model_dir: str, q: str, seed: int) -> dict:
    """Peers of 1 and 5 blocks in format ``q``, after serving a generation (a fresh prompt each): what one
    more block costs in resident memory against its weight bytes, and per-token latency against local
    transformers."""
    from transformers import AutoModelForCausalLM

    config = layout.load_config(model_dir)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    prompts = [fresh_prompt(config.vocab_size, args.prompt_tokens, 1000 * seed + i)
               for i in range(args.repeats * len(QUANT_LAYOUTS))]
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 quantization_config=quant.quantization_config(q, torch.float32))
    clock = harness.TokenClock()
    expected = [local.generate(ids, logits_processor=[clock], **gen) for ids in prompts]
    local_ms = 1000 * harness.median(clock.per_token)
    del local
    runs, per_token, equal = [], [], True
    for i, ids in enumerate(prompts):
        spans = QUANT_LAYOUTS[i % len(QUANT_LAYOUTS)]
        peers, generated = serve_and_read(model_dir, spans, q, ids, gen, args.threads)
        per_token += generated["per_token"]
        equal = equal and torch.equal(generated["tokens"], expected[i])
        small, big = peers[1], peers[5]
        runs.append({"spans": spans, "peers": [small, big],
                     **{f"{k}_per_block_bytes": (big[f"{k}_bytes"] - small[f"{k}_bytes"]) / 4
                        for k in ("rss", "rss_anon", "rss_file", "weight")}})
    per_block = harness.median([r["rss_per_block_bytes"] for r in runs])
    weights = harness.median([r["weight_per_block_bytes"] for r in runs])
    return {"quant": q, "runs": runs, "resident_per_block_bytes": per_block, "weight_bytes_per_block": weights,
            "resident_over_weights": per_block / weights, "target": TARGETS[q],
            "ratios": [r["rss_per_block_bytes"] / r["weight_per_block_bytes"] for r in runs],
            "peak_rss_5_blocks_bytes": max(r["peers"][1]["peak_rss_bytes"] for r in runs),
            "swarm_ms_per_token": 1000 * harness.median(per_token), "local_ms_per_token": local_ms,
            "equals_local": equal}


TARGETS = {"none": 1.05, "int8": 1.3, "nf4": 1.3}  # resident per block / its weight bytes, after serving


def quant_main(args) -> None:
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or quant_model(_say)
    rows = []
    for i, q in enumerate(args.quant.split(",")):
        _say(f"{q}: local transformers, then swarms of peers of blocks {QUANT_LAYOUTS}")
        rows.append(measure_quant(args, model_dir, q, seed=i))
    mib = 2**20
    print(harness.table(
        ["quant", "weights MiB per block", "resident MiB per block (median)", "resident / weights", "each run",
         "target", "peak RSS of a 5-block peer MiB", "swarm ms/token", "local ms/token", "equals local"],
        [[r["quant"], r["weight_bytes_per_block"] / mib, r["resident_per_block_bytes"] / mib,
          f"{r['resident_over_weights']:.3f}", " ".join(f"{x:.2f}" for x in r["ratios"]), f"<= {r['target']}",
          r["peak_rss_5_blocks_bytes"] / mib, r["swarm_ms_per_token"], r["local_ms_per_token"],
          "yes" if r["equals_local"] else "NO"] for r in rows]))
    path = harness.write_results("memory_quant", {"model_dir": model_dir, "layouts": QUANT_LAYOUTS, "formats": rows}, args)
    print(f"\nwrote {path}")


def self_sized_main(args) -> None:
    """A peer that sizes itself to --max-memory (no --blocks), the rest of the model on other peers, serving
    generations with long fresh prompts: its RSS after each, and its peak (VmHWM) against --max-memory."""
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or quant_model(_say)
    config = layout.load_config(model_dir)
    q = args.quant or "nf4"
    budget = quant.parse_size(args.max_memory)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    common = ["--quant", q, "--num-threads", str(args.threads), "--cache-tokens", str(args.cache_tokens)]
    rows = []
    with harness.BenchSwarm(model_dir, []) as swarm:
        sized = swarm._track(launch.start_peer(
            model_dir, swarm.initial_peers, name="self-sized", wait=False,
            extra=[*common, "--max-memory", args.max_memory, "--placement-jitter", "0", "--balance-period", "0"]))
        start, end = sized.wait_ready(harness.READY_TIMEOUT)["blocks"]
        sizing = next(line for line in sized.stderr_tail(20000).splitlines() if line.startswith("sizing:"))
        _say(f"the self-sized peer took blocks [{start}, {end}): {sizing}")
        rest = [span for span in ((0, start), (end, config.num_hidden_layers)) if span[0] < span[1]]
        for a, b in rest:
            swarm._track(launch.start_peer(model_dir, swarm.initial_peers, a, b, name=f"peer{a}-{b}", wait=False,
                                           extra=common)).wait_ready(harness.READY_TIMEOUT)
        ready = {"rss_bytes": rss_bytes(sized.pid), "peak_rss_bytes": rss_bytes(sized.pid, "VmHWM")}
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None,
                                                                formats=[f"float32/{q}"])
        try:
            for i in range(args.generations):
                model.generate(fresh_prompt(config.vocab_size, args.prompt_tokens, 7000 + i), **gen)
                rows.append({"generation": i + 1, "rss_bytes": rss_bytes(sized.pid),
                             "peak_rss_bytes": rss_bytes(sized.pid, "VmHWM")})
                _say(f"generation {i + 1}: RSS {rows[-1]['rss_bytes'] / 2**20:.0f} MiB, peak "
                     f"{rows[-1]['peak_rss_bytes'] / 2**20:.0f} MiB")
        finally:
            model.swarm.shutdown()
        group = group_rss_bytes(sized.pid)
    mib = 2**20
    peak = rows[-1]["peak_rss_bytes"]
    print(harness.table(["after", "RSS MiB", "peak RSS MiB", "--max-memory MiB"],
                        [["ready", ready["rss_bytes"] / mib, ready["peak_rss_bytes"] / mib, budget / mib]]
                        + [[f"generation {r['generation']}", r["rss_bytes"] / mib, r["peak_rss_bytes"] / mib,
                            budget / mib] for r in rows]))
    print(f"\nself-sized {q} peer: blocks [{start}, {end}), peak RSS {peak / mib:.0f} MiB against --max-memory "
          f"{budget / mib:.0f} MiB: {'kept' if peak <= budget else 'BROKEN'}; its process group (+ DHT child, "
          f"p2pd) {group / mib:.0f} MiB\n{sizing}")
    path = harness.write_results("memory_self_sized", {
        "model_dir": model_dir, "quant": q, "max_memory_bytes": budget, "blocks": [start, end], "sizing": sizing,
        "ready": ready, "generations": rows, "peak_rss_bytes": peak, "kept": peak <= budget,
        "group_rss_bytes": group}, args)
    print(f"\nwrote {path}")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct; with "
                                                          "--quant, a random ~330M-parameter Llama)")
    parser.add_argument("--quant", default=None, metavar="Q[,Q...]",
                        help="compare weight formats (none, int8, nf4) on the same blocks instead of dtypes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each peer")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --quant: swarms per layout of QUANT_LAYOUTS (each a fresh prompt)")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--self-sized", action="store_true",
                        help="a peer sized by --max-memory serving long prompts: is its peak RSS under it?")
    parser.add_argument("--max-memory", default="1200MiB", help="with --self-sized: the peer's --max-memory")
    parser.add_argument("--cache-tokens", type=int, default=8192, help="with --self-sized: the peer's --cache-tokens")
    parser.add_argument("--generations", type=int, default=4, help="with --self-sized: generations, each a fresh prompt")
    return parser


def main() -> None:
    parser = arguments()
    args = parser.parse_args()
    mode = (self_sized_main, 2000, 8) if args.self_sized else (quant_main, 32, 16) if args.quant else None
    if mode:  # each mode's own default prompt and generation lengths, unless given
        run, prompt_tokens, new_tokens = mode
        for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        return run(args)

    work = harness.workload(args, _say)
    model_dir, spans = work.model_dir, work.spans
    todo = plan(args, work.prompts)
    runtime = runtime_rss_bytes()
    rows = []
    for dtype, ids in zip(args.dtypes, todo):
        _say(f"{dtype}: starting a DHT node and {len(spans)} peers")
        rows += measure(args, model_dir, spans, work.prompts, ids, work.pad, dtype, runtime)

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
