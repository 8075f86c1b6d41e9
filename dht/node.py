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
"""

from __future__ import annotations

import asyncio
import logging
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


class Node:
    """A p2pd daemon owned by this process (``p2p``) and the DHT process running over it (``dht``,
    replaced by ``restart``). Make one with ``await Node.start(...)``; run ``watch`` in a task the owner
    keeps; ``await shutdown()`` at the end. Directory calls take ``node.dht`` at the time of the call."""

    def __init__(self, p2p: P2P, identity: Identity | None, initial_peers: Sequence[str], client_mode: bool,
                 signers: Sequence[Identity], startup_timeout: float):
        self.p2p = p2p
        self.dht: hivemind.DHT | None = None
        self.restarts = 0  # DHT processes started after the first
        self.restarted_at: float | None = None  # time.time() of the last restart
        self._identity, self._initial_peers, self._client_mode = identity, list(initial_peers), client_mode
        self._signers, self._startup_timeout = tuple(signers), startup_timeout

    @classmethod
    async def start(cls, identity: Identity | None, initial_peers: Sequence[str] = (), *, client_mode: bool = False,
                    signers: Sequence[Identity] = (), **options: Any) -> "Node":
        """Start the daemon, then the DHT over it. ``options`` are ``directory.p2p_options``' (host, port,
        announce_maddrs, relay_service, use_auto_relay, no_listen, startup_timeout); the rest as in
        ``directory.start_node``."""
        kwargs = directory.p2p_options(identity, initial_peers, client_mode=client_mode, **options)
        p2p = await P2P.create(**kwargs)
        node = cls(p2p, identity, initial_peers, client_mode, signers, kwargs["startup_timeout"])
        try:
            node.dht = await node._start_dht(node._initial_peers)
        except BaseException:
            await p2p.shutdown()
            raise
        return node

    async def _start_dht(self, initial_peers: list[str]) -> hivemind.DHT:
        dht = hivemind.DHT(
            initial_peers=initial_peers or None, p2p=self.p2p, start=True, await_ready=False,
            client_mode=self._client_mode, record_validators=[PeerRecordValidator(self._identity, self._signers)])
        try:  # wait off the event loop: the daemon's log reader and the RPC handlers keep running meanwhile
            await asyncio.get_running_loop().run_in_executor(None, dht.wait_until_ready, self._startup_timeout)
        except BaseException:
            dht.shutdown()
            raise
        return dht

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    def alive(self) -> bool:
        """Whether the DHT process is running (a non-blocking waitpid)."""
        return self.dht is not None and self.dht.is_alive()

    async def visible_maddrs(self) -> list[str]:
        """The daemon's reachable multiaddrs, /p2p/<id> included (empty for a node that does not listen)."""
        try:
            return [str(m) for m in await self.p2p.get_visible_maddrs()]
        except ValueError:  # hivemind raises when the daemon reports none
            return []

    async def restart(self) -> None:
        """Start a new DHT process over the same daemon, with the same arguments (a live old one is shut
        down first). Bootstraps from the initial peers and from the peers the daemon is connected to, so
        a node whose bootstrap peers have all left still rejoins."""
        old = self.dht
        if old is not None and old.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, old.shutdown)
        self.dht = await self._start_dht(self._initial_peers + await self._connected_maddrs())
        self.restarts += 1
        self.restarted_at = time.time()

    async def _connected_maddrs(self) -> list[str]:
        try:
            peers = await self.p2p.list_peers()
        except P2PDaemonError as e:
            logger.info("could not list the daemon's connections (bootstrapping from the initial peers only): %s", e)
            return []
        return [f"{addr}/p2p/{p.peer_id.to_base58()}" for p in peers[:MAX_EXTRA_BOOTSTRAP] for addr in p.addrs[:1]]

    async def watch(self, on_restart: Callable[[], Awaitable[None]] | None = None, *,
                    period: float = WATCH_PERIOD, stop: asyncio.Event | None = None) -> None:
        """Check every ``period`` seconds that the DHT process lives; restart a dead one (retrying with
        back-off) and then await ``on_restart()`` (the owner re-announces its records there). Returns
        when ``stop`` is set; runs until cancelled without one."""
        stop = stop or asyncio.Event()
        backoff = period
        while not await _wait(stop, period):
            if self.alive():
                continue
            logger.warning("the DHT process (pid %s) died with exit code %s; starting a new one over the same "
                           "p2p daemon (peer id %s: its addresses, RPC handlers and open streams are kept)",
                           self.dht.pid, self.dht.exitcode, self.peer_id)
            while True:
                try:
                    await self.restart()
                    break
                except _START_ERRORS as e:
                    logger.warning("restarting the DHT failed (%s: %s); trying again in %.0f s",
                                   type(e).__name__, e, backoff)
                    if await _wait(stop, backoff):
                        return
                    backoff = min(2 * backoff, MAX_RESTART_BACKOFF)
            backoff = period
            logger.warning("the DHT runs again (pid %d, restart %d)", self.dht.pid, self.restarts)
            if on_restart is not None:
                await on_restart()

    def statistics(self) -> dict[str, Any]:
        return {"dht_pid": self.dht.pid if self.dht is not None else None, "dht_alive": self.alive(),
                "dht_restarts": self.restarts, "dht_restarted_at": self.restarted_at}

    async def shutdown(self) -> None:
        """Stop the DHT process, then the daemon. Safe to call twice."""
        if self.dht is not None and self.dht.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self.dht.shutdown)
        await self.p2p.shutdown()


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless ``stop`` is set first; True if it was."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False


__all__ = ["Node", "WATCH_PERIOD"]
