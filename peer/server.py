"""The peer process: load blocks, join the DHT, serve RPCs, announce, leave cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import torch

from dht import directory, identity, records
from dht.ready import ready_line, write_maddr_file
from dht.records import PeerRecord, PeerState
from peer.blocks import BlockRunner, load_config
from peer.config import PeerConfig
from peer.handler import PeerHandler
from peer.sessions import SessionTable

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"


def model_id_for(model_dir: str, override: str | None) -> str:
    if override:
        records.model_key(override)  # validates
        return override
    return records.derive_model_id(load_config(model_dir).to_dict())


def measure_throughput(runner: BlockRunner, steps: int = 4) -> float:
    """Single-token inference steps per second through the whole span (batch 1)."""
    cache = runner.new_cache()
    hidden = torch.zeros(1, 1, runner.hidden_size)
    runner.forward(hidden, torch.zeros(1, 1, dtype=torch.long), None, cache)  # warm-up
    began = time.perf_counter()
    for i in range(steps):
        runner.forward(hidden, torch.full((1, 1), i + 1, dtype=torch.long), None, cache)
    return steps / max(time.perf_counter() - began, 1e-9)


class Peer:
    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg
        self.model_id = model_id_for(cfg.model_dir, cfg.model_id)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        print(f"loading blocks [{cfg.start}, {cfg.end}) of {cfg.model_dir} ({cfg.dtype})", file=sys.stderr, flush=True)
        self.runner = BlockRunner(cfg.model_dir, cfg.start, cfg.end, dtype=cfg.dtype, device=cfg.device)
        self.throughput = measure_throughput(self.runner)
        self.sessions = SessionTable(cfg.cache_tokens)
        self.handler = PeerHandler(
            self.runner, self.sessions, max_message_bytes=cfg.max_message_bytes, idle_timeout=cfg.idle_timeout,
            max_session_length=cfg.max_session_length, statistics=self.statistics,
        )
        self.identity = identity.load_or_create(cfg.identity_path)
        self.state = PeerState.JOINING
        self.maddrs: list[str] = []
        self.started_at = time.time()

    def statistics(self) -> dict:
        return {
            "peer_id": self.identity.peer_id, "model_id": self.model_id, "start": self.cfg.start,
            "end": self.cfg.end, "state": self.state.value, "dtype": self.cfg.dtype,
            "hidden_size": self.runner.hidden_size, "throughput": self.throughput,
            "sessions": len(self.sessions), "cache_tokens_total": self.sessions.budget_tokens,
            "cache_tokens_left": self.sessions.tokens_left, "requests_served": self.handler.requests_served,
            "num_parameters": self.runner.num_parameters, "loaded_tensors": list(self.runner.loaded_tensor_names),
            "uptime": time.time() - self.started_at, "version": SOFTWARE_VERSION,
        }

    def record(self) -> PeerRecord:
        return PeerRecord(
            peer_id=self.identity.peer_id, model_id=self.model_id, start=self.cfg.start, end=self.cfg.end,
            state=self.state, throughput=self.throughput, dtype=self.cfg.dtype,
            cache_tokens_left=self.sessions.tokens_left, version=SOFTWARE_VERSION,
            public_name=self.cfg.public_name, maddrs=tuple(self.maddrs[: records.MAX_MADDRS]),
        )

    async def announce(self, state: PeerState, timeout: float = 10.0) -> bool:
        """Store this peer's record; False if no DHT node accepted it within ``timeout`` seconds."""
        self.state = state
        try:
            return await asyncio.wait_for(
                directory.announce(self.dht, self.record(), ttl=2.5 * self.cfg.announce_period), timeout)
        except asyncio.TimeoutError:
            return False

    def run(self) -> None:
        cfg = self.cfg
        self.dht = directory.start_node(
            self.identity, cfg.initial_peers, host=cfg.host, port=cfg.port, announce_maddrs=cfg.announce_maddrs)
        try:
            asyncio.run(self._serve())
        finally:
            self.handler.shutdown()
            self.dht.shutdown()

    async def _serve(self) -> None:
        cfg = self.cfg
        p2p = await self.dht.replicate_p2p()
        await self.handler.register(p2p)
        self.maddrs = directory.visible_maddrs(self.dht)
        deadline = time.monotonic() + 60
        while not await self.announce(PeerState.ONLINE):
            if time.monotonic() > deadline:
                raise RuntimeError("no DHT node accepted this peer's announcement within 60 s: check --initial-peers")
            await asyncio.sleep(0.5)
        write_maddr_file(cfg.maddr_file, self.maddrs)
        print(ready_line("peer", peer_id=self.identity.peer_id, model_id=self.model_id, maddrs=self.maddrs,
                         blocks=[cfg.start, cfg.end]), flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=cfg.announce_period)
            except asyncio.TimeoutError:
                if not await self.announce(PeerState.ONLINE):
                    logger.warning("re-announcement was not stored by any DHT node")
        # Leaving: no new sessions, tell the swarm, let open sessions finish (bounded), then go.
        self.handler.accepting = False
        await self.announce(PeerState.DRAINING, timeout=3.0)
        deadline = time.monotonic() + cfg.drain_timeout
        while len(self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.announce(PeerState.OFFLINE, timeout=3.0)
        await p2p.shutdown()
        print(f"peer {self.identity.peer_id} left the swarm", file=sys.stderr, flush=True)


def main(cfg: PeerConfig) -> None:
    Peer(cfg).run()
