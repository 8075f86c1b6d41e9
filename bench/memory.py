"""Memory benchmark: each peer's resident memory next to the bytes of the block weights it serves.

A DHT node and 3 peers of SmolLM2-135M-Instruct on loopback, once per ``--dtypes`` entry. RSS is read
from /proc/<pid>/status (VmRSS) for the peer's own process, and summed over its process group (its
hivemind DHT child and p2pd daemon) for the whole footprint; once when the peers are ready, and again
after a generation (``--prompt-tokens`` + ``--new-tokens``, so the KV caches have been used). The
runtime baseline is a fresh interpreter that imported what a peer imports, with no weights.

    .venv/bin/python -m bench.memory [--dtypes float32 bfloat16]
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
from peer import layout

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

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
