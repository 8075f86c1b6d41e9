"""What the speed benchmarks share: a local swarm whose peers may sit behind WAN proxies, client options
that exist only in newer clients, a clock on generate()'s tokens, tables, and the JSON they write.

A proxied peer listens on port A and announces the proxy's port B, so everyone who dials it (the
client, and peers pushing to it) pays the proxy's one-way delay each way; the DHT bootstrap node and
the client are dialed directly. Every process started here is stopped by its PID in ``stop()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoTokenizer, LogitsProcessor

from client import ClientConfig
from swarmllm import checkpoints, launch
from swarmllm.demo import _spans as split_blocks

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
READY_TIMEOUT = 300.0  # seconds a SmolLM2 peer may take to load on a busy 2-core machine

__all__ = ["BenchSwarm", "TokenClock", "Workload", "add_arguments", "workload", "client_options", "supports",
           "split_blocks", "prompt_ids", "table", "results_name", "write_results", "critical_path_messages", "median",
           "RESULTS_DIR"]


def add_arguments(parser: argparse.ArgumentParser, *, trials: int, prompt_tokens: int, delay_ms: float | None,
                  delay_help: str) -> None:
    """The options every speed benchmark takes."""
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct, fp32)")
    parser.add_argument("--peers", type=int, default=3, help="peers splitting the blocks evenly")
    parser.add_argument("--trials", type=int, default=trials)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--delay-ms", type=float, default=delay_ms, help=delay_help)
    parser.add_argument("--wire-dtype", default=None, choices=["float16", "bfloat16"],
                        help="16-bit activations on the wire (when the client supports it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for local transformers, the client and each peer (1 is steadiest "
                             "on a shared 2-core machine)")


@dataclasses.dataclass(frozen=True)
class Workload:
    model_dir: str
    spans: list[tuple[int, int]]  # one peer per span
    tokenizer: object  # None for a checkpoint without tokenizer files (the prompt is seeded ids)
    ids: torch.Tensor  # (1, prompt_tokens)
    pad: int  # token id generate() pads with


def workload(args: argparse.Namespace, log) -> Workload:
    """The checkpoint (SmolLM2 unless --model-dir), its split into --peers spans, and the prompt; sets
    this process's torch threads to --threads when given."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or checkpoints.smollm2(log=log)
    config = AutoConfig.from_pretrained(model_dir)
    spans = split_blocks(config.num_hidden_layers, args.peers)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:  # a checkpoint without tokenizer files: ids are all we need
        log(f"no tokenizer in {model_dir} ({type(e).__name__}); the prompt is {args.prompt_tokens} seeded random ids")
        ids = torch.randint(3, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        eos = config.eos_token_id
        return Workload(model_dir, spans, None, ids, (eos[0] if isinstance(eos, list) else eos) or 0)
    return Workload(model_dir, spans, tokenizer, prompt_ids(tokenizer, args.prompt_tokens), tokenizer.eos_token_id)


def supports(field: str) -> bool:
    """Whether this checkout's ClientConfig has ``field`` (push, wire_dtype land with issue 6)."""
    return field in ClientConfig.__dataclass_fields__


def client_options(**wanted) -> dict:
    """The options this client supports, among ``wanted`` (None values are left out)."""
    return {k: v for k, v in wanted.items() if v is not None and supports(k)}


def critical_path_messages(hops: int, push: bool) -> int:
    """Messages one decode step waits for: the client relays every hop (2k) or peers push (k + 1)."""
    return hops + 1 if push else 2 * hops


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class BenchSwarm(launch.LocalSwarm):
    """A DHT node and one peer per span; with ``delay_ms``, each peer behind its own WAN proxy (all the
    proxies in one `python -m bench.wanproxy` process, so they never share the client's GIL), with
    optional jitter, loss and upload cap (see bench/wanproxy.py)."""

    def __init__(self, model_dir: str, spans: list[tuple[int, int]], *, delay_ms: float | None = None,
                 rate_mbit: float | None = None, extra: list[str] = (), jitter_ms: float = 0.0, loss: float = 0.0,
                 upload_mbit: float | None = None, seed: int | None = 0):
        self.procs: list[launch.SwarmProcess] = []  # so stop() works if the DHT node fails to start
        self.peers: list[launch.SwarmProcess] = []
        try:
            super().__init__()
            ports = [_free_port() for _ in spans]
            announce: list[list[str]] = [[] for _ in spans]
            if delay_ms is not None:
                args = [sys.executable, "-m", "bench.wanproxy", "--delay-ms", str(delay_ms),
                        "--listen", *["0"] * len(spans), "--target", *map(str, ports)]
                if rate_mbit:
                    args += ["--rate-mbit", str(rate_mbit)]
                if upload_mbit:
                    args += ["--upload-mbit", str(upload_mbit)]
                args += ["--jitter-ms", str(jitter_ms), "--loss", str(loss)]
                if seed is not None:
                    args += ["--seed", str(seed)]
                proxy = self._track(launch.SwarmProcess("wanproxy", args))
                proxy.wait_ready(30)
                announce = [["--announce-maddrs", f"/ip4/127.0.0.1/tcp/{b}"] for b, _ in proxy.ready["ports"]]
            for (a, b), port, ann in zip(spans, ports, announce):
                self.peers.append(self._track(launch.start_peer(
                    model_dir, self.dht.maddrs, a, b, name=f"peer{a}-{b}", wait=False,
                    extra=["--port", str(port), *ann, *extra])))
            for p in self.peers:
                p.wait_ready(READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> "BenchSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class TokenClock(LogitsProcessor):
    """Timestamps every token generate() chooses (called once per step, after the step's forward)."""

    def __init__(self, on_first=None):
        self.on_first = on_first  # called once, at the first token (e.g. to read the session's route)
        self.seen = None  # what on_first returned
        self.began = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if len(self.times) == 1 and self.on_first is not None:
            self.seen = self.on_first()
        return scores

    @property
    def first_token(self) -> float:
        """Seconds from creation (just before generate()) to the first token."""
        return self.times[0] - self.began

    @property
    def per_token(self) -> list[float]:
        """Seconds between consecutive tokens after the first (decode steps)."""
        return [b - a for a, b in zip(self.times, self.times[1:])]


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """Exactly ``tokens`` tokens of ordinary English text, (1, tokens)."""
    text = ("The history of the printing press begins in the fifteenth century, when movable type made books "
            "cheaper and faster to produce than ever before. ") * (tokens // 8 + 8)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] != tokens:
        raise ValueError(f"the filler text gave only {ids.shape[1]} tokens, {tokens} were asked for")
    return ids


def median(values) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (it reads fine in a terminal too)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(RESULTS_DIR)).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _source() -> dict:
    """The commit measured, and the tracked files that differ from it (work in progress measured too)."""
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": _git("rev-parse", "--short", "HEAD").strip(), "uncommitted_changes": changed}


def results_name(name: str, args: argparse.Namespace) -> str:
    """``name``, suffixed with the wire dtype when one was asked for (so a variant keeps the default's file)."""
    return f"{name}-{args.wire_dtype}" if getattr(args, "wire_dtype", None) else name


def write_results(name: str, results: dict, args) -> str:
    """bench/results/<name>.json with the date, machine, commit, the options and whatever was measured."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    doc = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": _machine(), **_source(),
           "client_fields": {f: supports(f) for f in ("push", "wire_dtype")},
           "options": vars(args), **results}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return path
