"""A DHT node that outlives its DHT process: what peers, clients and the health monitor run.

hivemind runs its DHT in a child process (``hivemind.DHT`` is a ``multiprocessing`` process) and, left to
itself, starts the p2pd daemon from there. Measured here (README, "When the DHT process dies"): a
SIGKILLed DHT child leaves its p2pd running as an orphan (RPC handlers and open streams on it keep
working, until the orphan next logs to its closed stdout), every call into the dead child waits forever,
and some 75 calls later the caller's thread blocks on the full command pipe.

So a ``Node`` starts the p2pd daemon in *this* process (``hivemind.P2P.create``) and runs the DHT child
over it (``hivemind.DHT(p2p=...)``, which replicates the daemon). When the child dies, ``watch`` starts a
new one over the same daemon, with the same arguments: the peer id, the addresses, the RPC handlers
registered on ``p2p`` and every open stream stay as they were; only the DHT's own state is new (its
routing table, rebuilt from the initial peers and the daemon's connections, and the records it stored
for others, which other nodes replicate). The owner re-announces its records at once (``on_restart``).
The restart logic lives here and only here.

If the daemon itself dies (rarer: the DHT process does the heavy lifting), ``watch`` replaces it too,
with the same arguments: the same identity, so the same peer id, but its addresses may change (a new
port unless one was given), its connections and every stream open on it are lost, and its RPC handlers
must be registered again: ``on_restart(daemon_replaced=True)`` tells the owner to do that (the peer
registers its handlers and re-announces its new addresses; the client's failover treats its broken
sessions like failed peers and rebuilds them by replay).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Awaitable, Callable, Sequence

import hivemind
from hivemind.p2p import P2P, P2PDaemonError

from dht import directory
from dht.identity import Identity
from dht.validator import PeerRecordValidator

logger = logging.getLogger(__name__)

WATCH_PERIOD = 1.0  # seconds between checks that the DHT process lives
MAX_RESTART_BACKOFF = 30.0  # seconds between failed restarts, at most
MAX_EXTRA_BOOTSTRAP = 16  # connected peers offered to a restarted DHT besides the initial peers
_START_ERRORS = (P2PDaemonError, RuntimeError, OSError, TimeoutError, ValueError)  # what a failed DHT start raises
MAX_BOOTSTRAP_BACKOFF = 5.0  # seconds between tries to reach the initial peers, at most


def _unreachable_bootstrap(e: BaseException) -> bool:
    """Whether a failed start failed because no initial peer answered (in time): p2pd exits with "failed
    to connect to bootstrap peers", hivemind's DHT raises "DHTNode bootstrap failed", or the DHT was not
    ready within the startup timeout (seen in bench.soak: the bootstrap node died between the daemon's
    connection and the DHT's first ping)."""
    return (isinstance(e, (P2PDaemonError, RuntimeError)) and "bootstrap" in str(e)) or isinstance(e, TimeoutError)


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT process, forked with its parent's signal set-up undone: a peer's asyncio loop sets
    SIGTERM to a no-op handler whose wakeup fd is the *parent's* loop, so a DHT forked after that would
    ignore SIGTERM and wake its parent's handler instead (measured: such a DHT outlived its shutdown and
    hung the peer's exit)."""

    def run(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        super().run()


def _stop(dht: hivemind.DHT, graceful: bool) -> None:
    """Stop a DHT process: through its command pipe if ``graceful`` (hivemind's shutdown, which ends
    with SIGTERM), else by SIGTERM at once; SIGKILL if it still lives. Blocking (up to seconds)."""
    if graceful:
        dht.shutdown()
    elif dht.is_alive():
        dht.terminate()
        dht.join(dht.shutdown_timeout)
    if dht.is_alive():
        dht.kill()
        dht.join(5)


class Node:
    """A p2pd daemon owned by this process (``p2p``) and the DHT process running over it (``dht``,
    replaced by ``restart``). Make one with ``await Node.start(...)``; run ``watch`` in a task the owner
    keeps; ``await shutdown()`` at the end. Directory calls take ``node.dht`` at the time of the call."""

    def __init__(self, p2p: P2P, p2p_kwargs: dict[str, Any], identity: Identity | None, initial_peers: Sequence[str],
                 client_mode: bool, signers: Sequence[Identity]):
        self.p2p = p2p  # replaced, with the same arguments, if the daemon dies
        self.dht: hivemind.DHT | None = None
        self.restarts = 0  # DHT processes started after the first
        self.daemon_restarts = 0  # daemons started after the first
        self.restarted_at: float | None = None  # time.time() of the last restart
        self._p2p_kwargs, self._identity, self._initial_peers = p2p_kwargs, identity, list(initial_peers)
        self._client_mode, self._signers = client_mode, tuple(signers)
        self._startup_timeout = p2p_kwargs["startup_timeout"]

    @classmethod
    async def start(cls, identity: Identity | None, initial_peers: Sequence[str] = (), *, client_mode: bool = False,
                    signers: Sequence[Identity] = (), bootstrap_wait: float = 0.0, **options: Any) -> "Node":
        """Start the daemon, then the DHT over it. ``options`` are ``directory.p2p_options``' (host, port,
        announce_maddrs, relay_service, use_auto_relay, no_listen, startup_timeout); the rest as in
        ``directory.start_node``. If no initial peer answers, try again (1 s, 2 s, ... 5 s apart) for up to
        ``bootstrap_wait`` seconds before raising: a bootstrap node restarting, or a swarm's whole set of
        bootstrap peers briefly unreachable, should delay a peer's start, not end it."""
        deadline = time.monotonic() + bootstrap_wait
        delay = 1.0
        while True:
            try:
                return await cls._start_once(identity, initial_peers, client_mode, signers, options)
            except _START_ERRORS as e:
                left = deadline - time.monotonic()
                if not _unreachable_bootstrap(e) or left <= 0:
                    raise
                logger.warning("none of the initial peers answered (%s); trying again for up to %.0f s more",
                               (str(e).strip().splitlines() or [type(e).__name__])[-1], left)
                await asyncio.sleep(min(delay, left))
                delay = min(2 * delay, MAX_BOOTSTRAP_BACKOFF)

    @classmethod
    async def _start_once(cls, identity: Identity | None, initial_peers: Sequence[str], client_mode: bool,
                          signers: Sequence[Identity], options: dict[str, Any]) -> "Node":
        kwargs = directory.p2p_options(identity, initial_peers, client_mode=client_mode, **options)
        p2p = await P2P.create(**kwargs)
        node = cls(p2p, kwargs, identity, initial_peers, client_mode, signers)
        try:
            node.dht = await node._start_dht(node._initial_peers)
        except BaseException:
            await p2p.shutdown()
            raise
        return node

    async def _start_dht(self, initial_peers: list[str]) -> hivemind.DHT:
        dht = _DHTProcess(
            initial_peers=initial_peers or None, p2p=self.p2p, start=True, await_ready=False,
            client_mode=self._client_mode, record_validators=[PeerRecordValidator(self._identity, self._signers)])
        try:  # wait off the event loop: the daemon's log reader and the RPC handlers keep running meanwhile
            await asyncio.get_running_loop().run_in_executor(None, dht.wait_until_ready, self._startup_timeout)
        except BaseException:
            _stop(dht, graceful=False)
            raise
        return dht

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    def alive(self) -> bool:
        """Whether the DHT process is running (a non-blocking waitpid)."""
        return self.dht is not None and self.dht.is_alive()

    def daemon_alive(self) -> bool:
        """Whether the p2pd daemon is running (hivemind keeps its asyncio subprocess as ``_child``)."""
        child = self.p2p._child
        return child is not None and child.returncode is None

    @property
    def daemon_pid(self) -> int | None:
        return self.p2p._child.pid if self.p2p._child is not None else None

    async def visible_maddrs(self) -> list[str]:
        """The daemon's reachable multiaddrs, /p2p/<id> included (empty for a node that does not listen)."""
        try:
            return [str(m) for m in await self.p2p.get_visible_maddrs()]
        except ValueError:  # hivemind raises when the daemon reports none
            return []

    async def restart(self) -> bool:
        """Start a new DHT process with the same arguments (a live old one is shut down first), over the
        same daemon if it lives, else over a new one (same arguments too). Bootstraps from the initial
        peers and from the peers the daemon is connected to, so a node whose bootstrap peers have all left
        still rejoins. Returns whether the daemon was replaced."""
        old, replaced = self.dht, not self.daemon_alive()
        if old is not None and old.is_alive():  # without its daemon it cannot shut down gracefully
            await asyncio.get_running_loop().run_in_executor(None, _stop, old, not replaced)
        if replaced:
            await self.p2p.shutdown()  # what is left of it: its sockets, its reader task
            self.p2p = await P2P.create(**self._p2p_kwargs)
            self.daemon_restarts += 1
        self.dht = await self._start_dht(self._initial_peers + await self._connected_maddrs())
        self.restarts += 1
        self.restarted_at = time.time()
        return replaced

    async def _connected_maddrs(self) -> list[str]:
        try:
            peers = await self.p2p.list_peers()
        except P2PDaemonError as e:
            logger.info("could not list the daemon's connections (bootstrapping from the initial peers only): %s", e)
            return []
        return [f"{addr}/p2p/{p.peer_id.to_base58()}" for p in peers[:MAX_EXTRA_BOOTSTRAP] for addr in p.addrs[:1]]

    async def watch(self, on_restart: Callable[[bool], Awaitable[None]] | None = None, *,
                    period: float = WATCH_PERIOD, stop: asyncio.Event | None = None) -> None:
        """Check every ``period`` seconds that the DHT process and the daemon live; restart what died
        (retrying with back-off), then await ``on_restart(daemon_replaced)`` (the owner re-announces its
        records there, and with a new daemon registers its handlers again). Returns when ``stop`` is
        set; runs until cancelled without one."""
        stop = stop or asyncio.Event()
        backoff = period
        while not await _wait(stop, period):
            if self.daemon_alive() and self.alive():
                continue
            if self.daemon_alive():
                logger.warning("the DHT process (pid %s) died with exit code %s; starting a new one over the same "
                               "p2p daemon (peer id %s: its addresses, RPC handlers and open streams are kept)",
                               self.dht.pid, self.dht.exitcode, self.peer_id)
            else:
                logger.warning("the p2p daemon (pid %s) died with exit code %s; starting a new one and a new DHT "
                               "process (same peer id %s; its connections and open streams are lost)",
                               self.daemon_pid, self.p2p._child.returncode, self.peer_id)
            while True:
                try:
                    replaced = await self.restart()
                    break
                except _START_ERRORS as e:
                    logger.warning("restarting the DHT failed (%s: %s); trying again in %.0f s",
                                   type(e).__name__, e, backoff)
                    if await _wait(stop, backoff):
                        return
                    backoff = min(2 * backoff, MAX_RESTART_BACKOFF)
            backoff = period
            logger.warning("the DHT runs again (pid %d, restart %d; daemon pid %s, %d replaced)",
                           self.dht.pid, self.restarts, self.daemon_pid, self.daemon_restarts)
            if on_restart is not None:
                await on_restart(replaced)

    def statistics(self) -> dict[str, Any]:
        return {"dht_pid": self.dht.pid if self.dht is not None else None, "dht_alive": self.alive(),
                "dht_restarts": self.restarts, "dht_restarted_at": self.restarted_at,
                "p2pd_pid": self.daemon_pid, "p2pd_restarts": self.daemon_restarts}

    async def shutdown(self) -> None:
        """Stop the DHT process, then the daemon. Safe to call twice."""
        if self.dht is not None and self.dht.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, _stop, self.dht, self.daemon_alive())
        await self.p2p.shutdown()


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless ``stop`` is set first; True if it was."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False


__all__ = ["Node", "WATCH_PERIOD"]
