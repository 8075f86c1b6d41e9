"""Start swarm processes and wait for their readiness line; stop them by PID. Used by the demo and tests.

Each process runs in its own process group (its hivemind DHT child and p2pd daemon included), so
stopping it by its PID's group leaves nothing behind. Every wait has a deadline.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

from dht.ready import READY_PREFIX, parse_ready_line


class ProcessDied(RuntimeError):
    pass


class SwarmProcess:
    """One swarm process in a session of its own. ``forked=True`` (for ``swarmllm_command`` args only)
    forks it from a warm interpreter (``swarmllm.forked``) instead of starting a fresh one."""

    def __init__(self, name: str, args: list[str], *, env: dict[str, str] | None = None, echo: bool = False,
                 forked: bool = False):
        self.name = name
        self.stderr_file = tempfile.NamedTemporaryFile(prefix=f"swarmllm-{name}-", suffix=".log", delete=False)
        env = {**os.environ, **(env or {})}
        if forked:
            prefix = swarmllm_command()
            if args[:len(prefix)] != prefix:
                raise ValueError(f"only swarmllm commands can be forked, got {args[:3]}")
            from swarmllm import forked as forking

            self.popen = forking.ForkedPopen(args[len(prefix):], stderr_file=self.stderr_file, env=env)
        else:
            self.popen = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=self.stderr_file, stdin=subprocess.DEVNULL, text=True,
                start_new_session=True, env=env,
            )
        self.pid = self.popen.pid
        self.ready: dict | None = None
        self._stopped = False
        self._terminated = False
        self._lines: queue.Queue = queue.Queue()
        self._echo = echo
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            if self._echo and not line.startswith(READY_PREFIX):
                sys.stdout.write(line)
            self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.stderr_file.name, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> dict:
        """Block until the READY line (returns its JSON), the process dies, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while self.ready is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} (pid {self.pid}) not ready after {timeout:.0f} s:\n{self.stderr_tail()}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(timeout=5)
                raise ProcessDied(f"{self.name} (pid {self.pid}) exited with {self.popen.returncode} "
                                  f"before it was ready:\n{self.stderr_tail()}")
            self.ready = parse_ready_line(line)
        return self.ready

    @property
    def maddrs(self) -> list[str]:
        if self.ready is None:
            raise RuntimeError(f"{self.name} is not ready")
        return self.ready["maddrs"]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process's whole group (the process, its DHT child and p2pd)."""
        if self._stopped:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """SIGTERM the process (it shuts its own children down) without waiting; ``stop`` finishes the job."""
        if not self._stopped and not self._terminated and self.alive():
            self._terminated = True
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process (it shuts its own children down), wait up to ``timeout`` seconds, then
        SIGKILL whatever is left of its group. Idempotent: a second call signals nothing (the PID may
        belong to another process by then)."""
        if self._stopped:
            return self.popen.returncode
        self.terminate()
        self._stopped = True
        if self.alive():
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may outlive its leader (p2pd, the DHT child); while it has members its id stays theirs
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.stdout:
            self.popen.stdout.close()
        self.stderr_file.close()
        try:
            os.unlink(self.stderr_file.name)
        except FileNotFoundError:
            pass
        return self.popen.returncode


def swarmllm_command(*args: str) -> list[str]:
    """How to run the swarmllm CLI from this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "swarmllm.cli", *args]


def start_dht(timeout: float = 60.0, extra: list[str] = (), **kwargs) -> SwarmProcess:
    proc = SwarmProcess("dht", swarmllm_command("dht", "--host", "127.0.0.1", *extra), **kwargs)
    proc.wait_ready(timeout)
    return proc


_PEER_NUMBERS = itertools.count(1)


def start_peer(model_dir: str, initial_peers: list[str], start: int | None = None, end: int | None = None, *,
               num_blocks: int | None = None, name: str = "peer", extra: list[str] = (), timeout: float = 120.0,
               wait: bool = True, **kwargs) -> SwarmProcess:
    """A peer serving [start, end), or ``num_blocks`` blocks placed where the swarm is weakest, or (with
    neither) as many blocks as fit in its --max-memory."""
    if num_blocks is not None:
        where = ["--num-blocks", str(num_blocks)]
    else:
        where = ["--blocks", f"{start}:{end}"] if start is not None else []
    # each local peer gets its own public name: clients treat a shared name as a sign of one operator
    args = swarmllm_command("peer", model_dir, "--initial-peers", *initial_peers, *where,
                            "--host", "127.0.0.1", "--name", f"{name}-{next(_PEER_NUMBERS)}", *extra)
    proc = SwarmProcess(name, args, **kwargs)
    if wait:
        proc.wait_ready(timeout)
    return proc


class LocalSwarm:
    """A DHT node on 127.0.0.1 plus the processes tracked with it; stop() stops each by PID, newest
    first (what the tests and the benchmarks start their swarms from)."""

    def __init__(self, dht_args: list[str] = (), *, forked: bool = False):
        self.procs: list[SwarmProcess] = []
        self.forked = forked  # start the DHT node (and, through start_peer(forked=...), peers) forked
        self.dht = self._track(start_dht(extra=list(dht_args), forked=forked))

    def _track(self, proc: SwarmProcess) -> SwarmProcess:
        self.procs.append(proc)
        return proc

    @property
    def initial_peers(self) -> list[str]:
        return self.dht.maddrs

    def stop(self, procs: list[SwarmProcess] | None = None) -> None:
        """Stop ``procs`` (default: every process, the DHT node last): signal them all at once (they shut
        down in parallel, still able to say goodbye on the DHT), then wait for and reap each."""
        chosen = list(self.procs) if procs is None else list(procs)
        for p in chosen:
            if p is not self.dht or procs is not None:
                p.terminate()
        for p in reversed(chosen):
            p.stop()
        self.procs = [p for p in self.procs if p not in chosen]
