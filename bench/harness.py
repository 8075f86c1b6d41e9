"""What the speed benchmarks share: a local swarm whose peers may sit behind WAN proxies, client options
that exist only in newer clients, prompts no peer has seen, a clock on generate()'s tokens, tables, and
the JSON they write.

Peers keep recent histories (prefix reuse): a prompt sent twice, or two prompts that open with the same
tokens, is served from a kept cache for that shared part, and a benchmark would time cache hits instead
of compute. So every benchmark draws its prompts from a ``FreshPrompts`` source, which refuses a prompt
that shares more than an allowed number of leading tokens with one it handed out before, refuses to
count a prompt sent to the swarm twice, and reports how many generations and distinct prompts went to
the swarm (each benchmark writes that into its results JSON).

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
import random
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

__all__ = ["BenchSwarm", "FreshPrompts", "RepeatedPrompt", "TokenClock", "Workload", "chat_opening",
           "add_arguments", "workload", "client_options", "supports",
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
    prompts: "FreshPrompts"  # of --prompt-tokens tokens each, never repeated
    pad: int  # token id generate() pads with


def workload(args: argparse.Namespace, log) -> Workload:
    """The checkpoint (SmolLM2 unless --model-dir), its split into --peers spans, and a source of fresh
    prompts; sets this process's torch threads to --threads when given."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or checkpoints.smollm2(log=log)
    config = AutoConfig.from_pretrained(model_dir)
    spans = split_blocks(config.num_hidden_layers, args.peers)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:  # a checkpoint without tokenizer files: ids are all we need
        log(f"no tokenizer in {model_dir} ({type(e).__name__}); prompts are {args.prompt_tokens} seeded random ids")
        eos = config.eos_token_id
        return Workload(model_dir, spans, None, FreshPrompts(args.prompt_tokens, vocab=config.vocab_size),
                        (eos[0] if isinstance(eos, list) else eos) or 0)
    return Workload(model_dir, spans, tokenizer, FreshPrompts(args.prompt_tokens, tokenizer=tokenizer),
                    tokenizer.eos_token_id)


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


SENTENCES = [
    "The history of the printing press begins in the fifteenth century.",
    "Movable type made books cheaper and faster to produce than ever before.",
    "Printers spread across Europe within a few decades of the first press.",
    "With them came pamphlets, newspapers and a public that could read and argue about ideas.",
    "Rivers carried timber, grain and salt to the market towns of the plain.",
    "The observatory on the hill recorded the weather every morning for ninety years.",
    "A good bridge is designed for the heaviest load it will ever carry, and then some.",
    "Bees find their way home by the angle of the sun, even when clouds hide it.",
    "The orchestra tuned to the oboe, whose single note filled the quiet hall.",
    "Early railways ran on wooden rails long before anyone thought of steam.",
    "Glaciers grind the rock beneath them into a flour fine enough to colour a lake.",
    "The harbour master kept a ledger of every ship, its cargo and its captain.",
]


def prompt_ids(tokenizer, tokens: int, seed: int = 0, lead: str = "") -> torch.Tensor:
    """Exactly ``tokens`` tokens of ordinary English text, (1, tokens): ``lead``, then ``SENTENCES`` in a
    seeded order, repeated as needed (no special tokens)."""
    order = list(SENTENCES)
    random.Random(seed).shuffle(order)
    text = lead + " ".join(order * (tokens // 100 + 1))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :tokens]
    if ids.shape[1] != tokens:
        raise ValueError(f"the filler text gave only {ids.shape[1]} tokens, {tokens} were asked for")
    return ids


class RepeatedPrompt(ValueError):
    """A prompt that peers may already keep (sent before, or opening like an earlier one)."""


_KEPT_PREFIX = 32  # leading tokens of each prompt remembered for the shared-prefix check (allowances stay below)


def _rows(ids: torch.Tensor, end: int | None = None) -> tuple:
    """A (batch, tokens) prompt, or its first ``end`` tokens, as a hashable key (the batch size is part of
    it, as it is of a kept history's digest chain)."""
    return tuple(map(tuple, ids[:, :end].tolist()))


class FreshPrompts:
    """Seeded prompts no peer has seen: of ``length`` tokens, English text (``tokenizer``) or random ids
    in [low, vocab), each opening with a token no earlier one opened with (a text prompt's first token is
    a word of the vocabulary, drawn, then ``prompt_ids`` text in a seeded order).

    Refuses (``RepeatedPrompt``) any prompt sharing more than ``shared_prefix`` leading tokens with one
    handed out before (0: not even the first token; a chat template's fixed opening needs more, see
    ``chat_opening``); ``take`` checks and records a prompt built elsewhere (a chat). ``sent`` counts a
    generation sent to the swarm and refuses a prompt sent before or never handed out; ``reused`` counts
    one repeated on purpose (a benchmark of prefix reuse itself). Deterministic: the same arguments
    hand out the same prompts, so a benchmark's prompts can be listed without running it."""

    def __init__(self, length: int, *, tokenizer=None, vocab: int | None = None, low: int = 3, seed: int = 0,
                 shared_prefix: int = 0):
        if (tokenizer is None) == (vocab is None):
            raise ValueError("FreshPrompts needs a tokenizer (English text) or a vocab size (random ids), one of them")
        if not 0 <= shared_prefix < _KEPT_PREFIX:
            raise ValueError(f"shared_prefix={shared_prefix} tokens: allowed 0 to {_KEPT_PREFIX - 1}")
        self.length, self.tokenizer, self.vocab, self.low = length, tokenizer, vocab, low
        self.shared_prefix = shared_prefix
        self.widest = shared_prefix  # the largest shared prefix any prompt handed out was allowed
        self.rng = random.Random(seed)
        self.handed_out: list[tuple] = []  # every prompt, in order (row tuples)
        self._prefixes: set[tuple] = set()  # the first 1.._KEPT_PREFIX tokens of each
        self._whole: set[tuple] = set()
        self._sent: set[tuple] = set()
        self.generations = 0  # sent to the swarm, fresh
        self.deliberate = 0  # sent to the swarm again on purpose
        self._words = None  # token ids that are words (text prompts open with one)
        self._words_used: set[int] = set()
        self._firsts: set[int] = set()  # first tokens of the one-row prompts handed out

    def _fresh(self, ids: torch.Tensor, shared_prefix: int) -> bool:
        return _rows(ids) not in self._whole and (ids.shape[1] <= shared_prefix
                                                  or _rows(ids, shared_prefix + 1) not in self._prefixes)

    def take(self, ids: torch.Tensor, shared_prefix: int | None = None) -> torch.Tensor:
        """Records ``ids`` (batch, tokens) as handed out; RepeatedPrompt if peers may keep part of it."""
        allowed = self.shared_prefix if shared_prefix is None else shared_prefix
        if not self._fresh(ids, allowed):
            raise RepeatedPrompt(f"prompt {ids[0, :8].tolist()}... ({ids.shape[1]} tokens) repeats or shares more "
                                 f"than {allowed} leading tokens with an earlier one: peers keep recent histories, so "
                                 f"it would time cache hits; draw another (FreshPrompts.next)")
        self.widest = max(self.widest, allowed)
        key = _rows(ids)
        self.handed_out.append(key)
        self._whole.add(key)
        self._prefixes.update(_rows(ids, n) for n in range(1, min(ids.shape[1], _KEPT_PREFIX) + 1))
        if ids.shape[0] == 1 and ids.shape[1]:
            self._firsts.add(int(ids[0, 0]))
        return ids

    def _word_ids(self) -> list[int]:
        if self._words is None:  # vocabulary entries that are a word of letters (no leading-space marker)
            self._words = sorted(i for t, i in self.tokenizer.get_vocab().items()
                                 if t.isascii() and t.isalpha() and len(t) >= 4)
        return self._words

    def _pick(self, choices: list[int], used: set[int]) -> int:
        for _ in range(1000):
            pick = self.rng.choice(choices)
            if pick not in used:
                return pick
        raise RepeatedPrompt(f"no unused opening token left after {len(self.handed_out)} prompts: use a larger "
                             "vocabulary or allow a shared prefix (FreshPrompts(shared_prefix=1))")

    def word(self) -> str:
        """A vocabulary word this source has not handed out, to open text built elsewhere (a chat's system message)."""
        pick = self._pick(self._word_ids(), self._words_used)
        self._words_used.add(pick)
        return self.tokenizer.decode([pick])

    def next(self, length: int | None = None, shared_prefix: int | None = None) -> torch.Tensor:
        """A new prompt, (1, length or self.length), recorded as handed out."""
        length = length or self.length
        allowed = self.shared_prefix if shared_prefix is None else shared_prefix
        for _ in range(1000):
            seed = self.rng.randrange(2**31)
            if self.tokenizer is None:
                ids = torch.randint(self.low, self.vocab, (1, length), generator=torch.Generator().manual_seed(seed))
                if allowed == 0:
                    ids[0, 0] = self._pick(range(self.low, self.vocab), self._firsts)
            else:
                first = self._pick(self._word_ids(), self._firsts)
                body = (prompt_ids(self.tokenizer, length - 1, seed, lead=" ") if length > 1
                        else torch.empty(1, 0, dtype=torch.long))
                ids = torch.cat([torch.tensor([[first]]), body], dim=1)
            if self._fresh(ids, allowed):
                return self.take(ids, allowed)
        raise RepeatedPrompt(f"1000 draws of {length}-token prompts all repeated an earlier one's opening: "
                             "use a larger vocabulary or allow a longer shared prefix")

    def sent(self, ids: torch.Tensor) -> torch.Tensor:
        """Counts a generation sent to the swarm; RepeatedPrompt if ``ids`` was sent before or never handed out."""
        key = _rows(ids)
        if key not in self._whole:
            raise RepeatedPrompt("a prompt sent to the swarm that this source never handed out: draw it with "
                                 "FreshPrompts.next or record it with take")
        if key in self._sent:
            raise RepeatedPrompt(f"prompt {ids[0, :8].tolist()}... was sent to the swarm before: peers keep it, "
                                 "so this generation would time cache hits; draw another (FreshPrompts.next)")
        self._sent.add(key)
        self.generations += 1
        return ids

    def reused(self, ids: torch.Tensor) -> torch.Tensor:
        """Counts a generation that repeats (part of) an earlier prompt on purpose (prefix reuse measured)."""
        self.deliberate += 1
        return ids

    def summary(self) -> dict:
        """What went to the swarm, for a benchmark's results JSON."""
        return {"swarm_generations": self.generations + self.deliberate,
                "distinct_swarm_prompts": len(self._sent), "fresh_swarm_generations": self.generations,
                "deliberately_repeated_generations": self.deliberate,
                "allowed_shared_prefix_tokens": self.widest, "prompts_handed_out": len(self.handed_out)}


def chat_opening(tokenizer) -> int:
    """Tokens every chat of this tokenizer's template opens with (two chats whose system messages differ
    from their first letter share exactly these): the shared prefix a chat benchmark must allow."""
    a, b = (tokenizer(tokenizer.apply_chat_template([{"role": "system", "content": c}, {"role": "user", "content": "?"}],
                                                    tokenize=False, add_generation_prompt=True))["input_ids"]
            for c in ("Apple", "Zebra"))
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
