"""Soak benchmark: does a swarm survive hours of faults while clients generate without pause?

A tiny random Llama (fixed seed, SmolLM2's tokenizer, so the API can serve it) on ``--peers`` peers
with overlapping spans; one client process per kind (greedy, sampled, speculative, strict, and one
streaming through ``swarmllm api``: see ``bench/soak_clients.py``) generating fresh prompts back to
back and checking each generation against local transformers. Every ``--chaos-every`` seconds one of
the churned peers (all but the ``--stable-peers`` ones) is, in turn, SIGKILLed (and a replacement
started with its identity), SIGSTOPped (SIGCONT after ``--stop-seconds``), or restarted (SIGTERM,
drained, started again); every ``--dht-every`` seconds one of the ``--dht-nodes`` bootstrap DHT nodes
(``python -m swarmllm.cli dht`` on a fixed port with a kept identity, so its multiaddr survives; everyone
is given all of them, as a public swarm lists several), in turn, is SIGKILLed and started again
``--dht-down`` seconds later; at ``--liar-at`` seconds a peer with ``--adversary
wrong_weights@after=N`` joins. Per ``--window`` seconds: generations, lost ones (an error reached the
client), wrong ones, tokens/s, p50/p99 per-token latency, the faults; at each window's end the RSS, open
fds and threads of every long-lived process. A process that dies unexpectedly or fails to start is
logged with its stderr tail and started again. Every process is stopped by its PID at the end.

    .venv/bin/python -m bench.soak [--minutes 60] [--window 300] [--peers 10]
    .venv/bin/python -m bench.soak --minutes 3 --window 60          # smoke run (about 6 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from typing import Callable

import psutil

from bench import harness, soakstats
from bench.soak_clients import KINDS
from swarmllm import checkpoints, launch

START_TIMEOUT = 240.0  # seconds a process may take to print its ready line (10+ processes on 2 cores)
DRAIN_TIMEOUT = 20.0  # seconds a restarted peer may drain before it is killed
RETRY_DELAY = 5.0  # seconds before a process that failed to start is tried again


def _say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Managed:
    """A process the soak keeps alive: ``make`` starts it (without waiting for its ready line)."""
    name: str
    make: Callable[[], launch.SwarmProcess]
    long_lived: bool  # never faulted on purpose: its resources are sampled
    churn: bool = False  # a chaos victim
    proc: launch.SwarmProcess | None = None
    state: str = "down"  # down | starting | up | frozen | draining
    due: float = 0.0  # when the pending transition is due (start, SIGCONT, drain deadline)
    starts: int = 0
    metrics_port: int | None = None  # a peer's --metrics-port: its steps served are sampled too
    ids: set = dataclasses.field(default_factory=set)  # peer ids it had (the same with a kept identity)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: str, logdir: str):
        self.args, self.workdir, self.logdir = args, workdir, logdir
        self.rng = random.Random(args.seed)
        self.faults: list[dict] = []
        self.notes: list[dict] = []  # unexpected deaths and failed starts, with their stderr tails
        self.samples: list[dict] = []
        self.managed: list[Managed] = []
        self.start = None
        self.dhts: list[Managed] = []  # the bootstrap DHT nodes

    # ------------------------------------------------------------------ processes

    def fault(self, action: str, target: str, **detail) -> None:
        self.faults.append({"t": time.time(), "action": action, "target": target, **detail})

    def keep_log(self, m: Managed) -> str:
        """Copy the process's stderr into the log folder (SwarmProcess.stop deletes its file)."""
        dest = os.path.join(self.logdir, f"{m.name.split()[0]}-{m.proc.pid}.log")
        try:
            shutil.copyfile(m.proc.stderr_file.name, dest)
        except OSError:
            pass
        return dest

    def reap(self, m: Managed) -> None:
        if m.proc is not None:
            self.keep_log(m)
            m.proc.stop()
        m.state = "down"

    def launch(self, m: Managed) -> None:
        m.proc, m.state, m.due = m.make(), "starting", time.time() + START_TIMEOUT
        m.starts += 1

    def trouble(self, m: Managed, what: str) -> None:
        """An unexpected death or a failed start: noted with its log, retried after RETRY_DELAY."""
        tail = m.proc.stderr_tail(3000)
        log = self.keep_log(m)
        self.fault(what, m.name)
        self.notes.append({"t": time.time(), "what": what, "process": m.name, "pid": m.proc.pid,
                           "returncode": m.proc.popen.poll(), "log": log, "stderr_tail": tail})
        _say(f"{what}: {m.name} (pid {m.proc.pid}, exit {m.proc.popen.poll()}); log {log}")
        m.proc.stop()
        m.state, m.due = "down", time.time() + RETRY_DELAY

    def poll(self, m: Managed, now: float) -> None:
        """Move ``m`` along: ready, dead, thawed, drained, due to start."""
        if m.state == "down" and m.due and now >= m.due:
            self.launch(m)
        elif m.state == "starting":
            try:
                m.proc.wait_ready(0.01)
            except TimeoutError:
                if now >= m.due:
                    self.trouble(m, "start_timeout")
                return
            except launch.ProcessDied:
                self.trouble(m, "start_failed")
                return
            m.state = "up"
            m.ids.add(m.proc.ready.get("peer_id"))
            if m.starts > 1:
                self.fault("up", m.name)
        elif m.state == "up" and not m.proc.alive():
            self.trouble(m, "died")
        elif m.state == "frozen" and now >= m.due:
            m.proc.signal(signal.SIGCONT)
            m.state = "up"
            self.fault("cont", m.name)
        elif m.state == "draining" and (not m.proc.alive() or now >= m.due):
            self.reap(m)
            self.launch(m)

    def chaos(self, action: str) -> None:
        victims = [m for m in self.managed if m.churn and m.state == "up"]
        if not victims:
            self.fault("skipped", "-", wanted=action)
            return
        m = self.rng.choice(victims)
        self.fault(action, m.name)
        if action == "kill":
            m.proc.signal(signal.SIGKILL)
            self.reap(m)
            self.launch(m)
        elif action == "stop":
            m.proc.signal(signal.SIGSTOP)
            m.state, m.due = "frozen", time.time() + self.args.stop_seconds
        else:
            m.proc.terminate()
            m.state, m.due = "draining", time.time() + DRAIN_TIMEOUT

    # ------------------------------------------------------------------ measurement

    def sample(self) -> None:
        """RSS, open fds and threads of each long-lived process and its children (p2pd, DHT child)."""
        t = time.time() - self.start
        for m in self.managed:
            if not m.long_lived or m.state not in ("up", "frozen"):
                continue
            try:
                root = psutil.Process(m.proc.pid)
                tree = [root, *root.children(recursive=True)]
                rss = fds = threads = 0
                for p in tree:
                    with p.oneshot():
                        rss, fds, threads = rss + p.memory_info().rss, fds + p.num_fds(), threads + p.num_threads()
            except psutil.Error:
                continue
            self.samples.append({"t": t, "name": m.name, "pid": m.proc.pid, "rss": rss, "fds": fds,
                                 "threads": threads, "requests": _steps_served(m.metrics_port)})

    def generations(self) -> list[dict]:
        gens = []
        for kind in self.args.clients:
            path = os.path.join(self.workdir, f"events-{kind}.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    gens += [json.loads(line) for line in f if line.endswith("\n")]
        return gens

    # ------------------------------------------------------------------ the swarm

    def build(self) -> None:
        """The checkpoint, the DHT node, the peers, the API server and the clients, each started and ready."""
        a = self.args
        model_dir = checkpoints.tiny_chat(os.path.join(self.workdir, "model"), seed=a.seed, hidden_size=a.hidden,
                                          intermediate_size=2 * a.hidden, num_hidden_layers=a.layers)
        # --dht-nodes bootstrap nodes, each on a fixed port with a kept identity (its multiaddr survives a
        # restart), each (re)started with the others as its initial peers; everyone is given all of them,
        # as a public swarm lists several bootstrap nodes
        maddrs: list[str] = []
        for i in range(a.dht_nodes):
            self.dhts.append(self.add(self.dht_node(i, harness._free_port(), maddrs)))
            self.launch(self.dhts[-1])
            self.wait([self.dhts[-1]])
            maddrs = maddrs + self.dhts[-1].proc.maddrs
        spans = soakstats.peer_spans(a.layers, a.peers, a.stable_peers, a.width)
        peers = [self.add(self.peer(model_dir, maddrs, i, span, stable=i < a.stable_peers))
                 for i, span in enumerate(spans)]
        api_port = harness._free_port()
        api = self.add(Managed("api server", lambda: launch.SwarmProcess("api", launch.swarmllm_command(
            "api", model_dir, "--initial-peers", *maddrs, "--port", str(api_port), "--max-concurrency", "2",
            "--route-timeout", "30")), long_lived=True))
        for m in peers:
            self.launch(m)
        self.wait(peers)
        self.launch(api)
        self.wait([api])
        url, name = api.proc.ready["url"], api.proc.ready["model"]
        clients = [self.add(self.client(model_dir, maddrs, i, kind, url, name)) for i, kind in enumerate(a.clients)]
        for m in clients:
            self.launch(m)
        self.wait(clients)
        # The liar serves every block: one hop instead of two or more makes it the cheapest route for
        # clients that have not measured it yet, so it gets the traffic a long con needs.
        liar_port = harness._free_port()
        self.liar = Managed("liar", lambda: launch.start_peer(
            model_dir, maddrs, 0, a.layers, name="liar", wait=False,
            extra=[*self.peer_args("liar"), "--throughput", "10000", "--metrics-port", str(liar_port),
                   "--adversary", f"wrong_weights@after={a.liar_after_steps}"]), long_lived=True,
            metrics_port=liar_port)
        self.model_dir = model_dir

    def dht_node(self, i: int, port: int, before: list[str]) -> Managed:
        key = os.path.join(self.workdir, f"dht{i}.key")

        def make() -> launch.SwarmProcess:  # the other nodes are its initial peers (those up before it, at first)
            others = [addr for m in self.dhts if m.proc is not None and m.name != f"dht{i}" for addr in m.proc.maddrs]
            return launch.SwarmProcess(f"dht{i}", launch.swarmllm_command(
                "dht", "--host", "127.0.0.1", "--port", str(port), "--identity", key,
                "--initial-peers", *(others or before)))
        return Managed(f"dht{i}", make, long_lived=True)

    def add(self, m: Managed) -> Managed:
        self.managed.append(m)
        return m

    def peer_args(self, name: str) -> list[str]:
        return ["--identity", os.path.join(self.workdir, f"{name}.key"), "--device", "cpu", "--num-threads", "1"]

    def peer(self, model_dir: str, maddrs: list[str], i: int, span: tuple[int, int], stable: bool) -> Managed:
        a, b = span
        label = f"peer{i} [{a},{b})" + (" stable" if stable else "")
        port = harness._free_port() if stable else None
        metrics = ["--metrics-port", str(port)] if port else []
        return Managed(label, lambda: launch.start_peer(model_dir, maddrs, a, b, name=f"peer{i}", wait=False,
                                                        extra=[*self.peer_args(f"peer{i}"), *metrics]),
                       long_lived=stable, churn=not stable, metrics_port=port)

    def client(self, model_dir: str, maddrs: list[str], i: int, kind: str, url: str, api_model: str) -> Managed:
        a, starts = self.args, iter(range(10**6))

        def make() -> launch.SwarmProcess:  # a fresh seed at each start: a restarted client's prompts are new too
            seed = a.seed * 10**6 + i * 10**4 + next(starts)
            args = [sys.executable, "-m", "bench.soak_clients", kind, model_dir, "--initial-peers", *maddrs,
                    "--events", os.path.join(self.workdir, f"events-{kind}.jsonl"), "--seed", str(seed),
                    "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)]
            if kind == "api":
                args += ["--api-url", url, "--api-model", api_model]
            return launch.SwarmProcess(f"client-{kind}", args)

        return Managed(f"client {kind}", make, long_lived=True)

    def wait(self, ms: list[Managed]) -> None:
        """Block until every one of ``ms`` is up (failed starts are retried, as in the run)."""
        while any(m.state != "up" for m in ms):
            now = time.time()
            for m in ms:
                self.poll(m, now)
            time.sleep(0.2)

    def stop_all(self) -> None:
        """Every process, by its PID: thaw the frozen, signal all (they shut down in parallel), reap each."""
        live = [m for m in self.managed if m.proc is not None and m.state != "down"]
        for m in live:
            if m.state == "frozen":
                m.proc.signal(signal.SIGCONT)
        for m in live:  # the DHT nodes last: the others may still say goodbye on them
            if m not in self.dhts:
                m.proc.terminate()
        for m in sorted(live, key=lambda m: m in self.dhts):
            self.reap(m)

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        a = self.args
        self.start = now = time.time()
        end = self.start + 60 * a.minutes
        _say(f"all up; soaking for {a.minutes} min, a report every {a.window:.0f} s; logs in {self.logdir}")
        self.sample()
        actions = ["kill", "stop", "restart"]
        next_chaos, next_dht, next_window = now + a.chaos_every, now + a.dht_every, now + a.window
        liar_at, rounds, dht_kills = self.start + a.liar_at, 0, 0
        while now < end:
            for m in self.managed:
                self.poll(m, now)
            if now >= next_chaos and a.chaos_every > 0:
                self.chaos(actions[rounds % len(actions)])
                rounds, next_chaos = rounds + 1, next_chaos + a.chaos_every
            if now >= next_dht and a.dht_every > 0 and all(m.state == "up" for m in self.dhts):
                victim = self.dhts[dht_kills % len(self.dhts)]  # in turn; never two down at once
                self.fault("dht_kill", victim.name)
                victim.proc.signal(signal.SIGKILL)
                self.reap(victim)
                victim.due, next_dht, dht_kills = now + a.dht_down, next_dht + a.dht_every, dht_kills + 1
            if now >= liar_at and self.liar not in self.managed:
                self.fault("liar_join", self.liar.name)
                self.launch(self.add(self.liar))
            if now >= next_window:
                self.sample()
                self.report(final=False)
                next_window += a.window
            time.sleep(0.25)
            now = time.time()
        self.sample()

    def names_by_id(self) -> dict[str, str]:
        return {pid: m.name for m in self.managed for pid in m.ids if pid}

    def bans(self, gens: list[dict]) -> dict[str, list[str]]:
        """Per client, the peers its reputation book banned at its last report (by name)."""
        names, last = self.names_by_id(), {}
        for g in gens:
            if "banned" in g:
                last[g["client"]] = [names.get(p, p) for p in g["banned"]]
        return last

    def report(self, final: bool) -> None:
        a, gens = self.args, self.generations()
        end = min(time.time(), self.start + 60 * a.minutes)
        rows = soakstats.window_rows(gens, self.faults, self.start, a.window, end)
        if not final:
            r = rows[-2] if len(rows) > 1 and rows[-1]["to_s"] - rows[-1]["from_s"] < a.window / 2 else rows[-1]
            _say(f"window {_minutes(r)} min: {r['generations']} generations, {r['lost']} lost, "
                 f"{r['wrong']}/{r['checked']} wrong, p50 {_num(r['p50_ms'])} ms, p99 {_num(r['p99_ms'])} ms, "
                 f"faults {soakstats.fault_summary(r['faults'])}")
        measured = [g for g in gens if g["t1"] >= self.start]
        clients = soakstats.client_rows(measured, end - self.start)
        headers, resources = soakstats.resource_rows(self.samples)
        steps_headers, steps = soakstats.steps_rows(self.samples)
        bans = self.bans(measured)
        tables = [
            harness.table(soakstats.WINDOW_HEADERS, [
                [_minutes(r), r["generations"], r["lost"],
                 f"{r['wrong']} / {r['checked']}", _num(r["tokens_per_s"]), _num(r["p50_ms"]), _num(r["p99_ms"]),
                 soakstats.fault_summary(r["faults"])] for r in rows]),
            harness.table(soakstats.CLIENT_HEADERS + ["bans in its book"], [
                [c["client"], c["generations"], c["lost"], f"{c['wrong']} / {c['checked']}", _num(c["p50_ms"]),
                 _num(c["p99_ms"]), soakstats.fault_summary(c["errors"]),
                 ", ".join(bans.get(c["client"], [])) or ("—" if c["client"] != "api" else "(not visible)")]
                for c in clients]),
            "RSS MiB / open fds / threads (process + children; * = restarted since the previous sample)\n\n"
            + harness.table(headers, resources),
            f"Steps answered (the peer's requests counter; the liar is honest for its first {a.liar_after_steps})"
            "\n\n" + harness.table(steps_headers, steps)]
        notes = [f"- {time.strftime('%H:%M:%S', time.localtime(n['t']))} {n['what']}: {n['process']} "
                 f"(exit {n['returncode']}), log {n['log']}" for n in self.notes]
        markdown = "\n\n".join([f"# soak: {a.minutes} min, {a.peers} peers, faults every {a.chaos_every:.0f} s",
                                *tables, "Unexpected deaths and failed starts:\n\n" + ("\n".join(notes) or "none")])
        name = a.name or f"soak-{a.minutes:g}min"
        path = harness.write_results(name, {
            "windows": rows, "clients": clients, "bans": bans, "resources": self.samples, "faults": self.faults,
            "notes": self.notes, "peer_ids": self.names_by_id(), "starts": {m.name: m.starts for m in self.managed}, "final": final,
            "log_dir": self.logdir}, a)
        with open(path[:-len(".json")] + ".md", "w") as f:
            f.write(markdown + "\n")
        if final:
            print(markdown)
            _say(f"wrote {path} and its .md")


def _steps_served(port: int | None) -> int | None:
    """A peer's swarmllm_peer_requests_total from its metrics endpoint (None: no endpoint or no answer)."""
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("swarmllm_peer_requests_total ")), None)
    return None if line is None else int(float(line.split()[1]))


def _minutes(row: dict) -> str:
    return f"{row['from_s'] / 60:.3g}-{row['to_s'] / 60:.3g}"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the measured run")
    parser.add_argument("--window", type=float, default=300.0, help="seconds per report window")
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--stable-peers", type=int, default=2,
                        help="peers never faulted (they split the blocks evenly); the others are churned")
    parser.add_argument("--layers", type=int, default=8, help="blocks of the tiny model")
    parser.add_argument("--width", type=int, default=4, help="blocks per churned peer")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    parser.add_argument("--chaos-every", type=float, default=15.0,
                        help="seconds between faults (kill, stop, restart in turn; 0 = none)")
    parser.add_argument("--stop-seconds", type=float, default=10.0, help="how long a SIGSTOPped peer stays frozen")
    parser.add_argument("--dht-nodes", type=int, default=2,
                        help="bootstrap DHT nodes (everyone is given all of them; one is killed at a time)")
    parser.add_argument("--dht-every", type=float, default=120.0,
                        help="seconds between SIGKILLs of a bootstrap DHT node, in turn (0 = never)")
    parser.add_argument("--dht-down", type=float, default=10.0, help="seconds the DHT node stays dead")
    parser.add_argument("--liar-at", type=float, default=None,
                        help="seconds into the run when the liar joins (default: a third of the run)")
    parser.add_argument("--liar-after-steps", type=int, default=100, help="steps the liar serves honestly first")
    parser.add_argument("--clients", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file name (default: soak-<minutes>min)")
    parser.add_argument("--log-dir", default=None, help="where every process's stderr is kept (default: a temp dir)")
    args = parser.parse_args()
    if args.liar_at is None:
        args.liar_at = 60 * args.minutes / 3
    workdir = tempfile.mkdtemp(prefix="soak-")
    logdir = args.log_dir or os.path.join(workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by every process
    os.environ["SWARMLLM_REPUTATION_PATH"] = os.path.join(workdir, "reputation.json")  # not the user's book
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally stops every process
    soak = Soak(args, workdir, logdir)
    try:
        _say(f"starting {args.dht_nodes} DHT nodes, {args.peers} peers, the API server and {len(args.clients)} clients "
             f"(work dir {workdir})")
        soak.build()
        soak.run()
    finally:
        _say("stopping every process")
        soak.stop_all()
        if soak.start is not None:
            soak.report(final=True)


if __name__ == "__main__":
    main()
