"""Starting swarmllm processes from a warm interpreter (multiprocessing's forkserver).

A fresh `python -m swarmllm.cli peer …` spends about 8 s of CPU importing torch, transformers and
hivemind before it does anything; a test suite that starts a hundred peers on two cores spends most
of its time there. Here a forkserver imports them once (``PRELOAD``) and every process is forked from
it: a real process of its own (own PID, own process group via ``setsid``, stdout and stderr in files)
that runs the very same ``swarmllm.cli.main(argv)`` as the console script, with fresh random seeds.

``ForkedPopen`` offers the part of ``subprocess.Popen`` that ``launch.SwarmProcess`` uses (pid,
poll, wait, returncode, stdout lines). Benchmarks keep plain processes (a forked process shares the
server's pages, which would skew its memory figures).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

ENTRY = "swarmllm.cli"  # the module whose main(argv) a forked process runs, as `python -m swarmllm.cli` would
PRELOAD = ["torch", "transformers", "hivemind", ENTRY, "peer.server", "dht.bootstrap", "client.model"]

_context: multiprocessing.context.BaseContext | None = None


def _get_context():
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def stop_server() -> None:
    """Stop the forkserver, if one was started, and reap it by its PID (its children are not affected:
    each runs in a session of its own)."""
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        forkserver._forkserver._stop()


def _child(argv: list[str], stdout_path: str, stderr_path: str, env: dict[str, str]) -> None:
    """In the forked process: a session of its own, files for stdio, fresh seeds, then the CLI."""
    os.setsid()
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    import random

    import numpy
    import torch

    random.seed()
    numpy.random.seed()
    torch.seed()
    # The process's entry point, named like a command line names it: this module starts the CLI, it does
    # not depend on it (the CLI starts processes through launch -> here, so an import would be a circle).
    importlib.import_module(ENTRY).main(argv)


class _TailLines:
    """The lines a running process appends to a file, until it has exited and the file is read out."""

    def __init__(self, path: str, popen: "ForkedPopen"):
        self._path, self._popen = path, popen

    def __iter__(self) -> Iterator[str]:
        with open(self._path, errors="replace") as f:
            partial = ""
            while True:
                chunk = f.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        yield partial
                        partial = ""
                    continue
                if self._popen.poll() is not None:
                    rest = f.read()
                    if partial or rest:
                        yield partial + rest
                    return
                time.sleep(0.05)

    def close(self) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class ForkedPopen:
    """``swarmllm <argv>`` forked from the warm server; stderr goes to ``stderr_file``."""

    def __init__(self, argv: list[str], *, stderr_file, env: dict[str, str]):
        fd, stdout_path = tempfile.mkstemp(prefix="swarmllm-stdout-", suffix=".log")
        os.close(fd)
        self._process = _get_context().Process(target=_child, args=(argv, stdout_path, stderr_file.name, env),
                                               daemon=False)
        self._lock = threading.Lock()
        self._process.start()
        self.pid: int = self._process.pid
        self.stdout = _TailLines(stdout_path, self)

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        # One reader at a time: the forkserver reports an exit code once, on a pipe that two threads
        # polling together could both try to read (the second would see EOF and record 255).
        with self._lock:
            return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["swarmllm"], timeout)
            time.sleep(0.02)
        return code
