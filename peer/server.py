"""The peer process: join the DHT, pick (or take) its blocks, load them, serve RPCs, announce itself,
move when the swarm needs it elsewhere, and leave cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time

import torch

from dht import directory, identity, records
from dht.node import Node
from dht.ready import ready_line, write_maddr_file
from dht.records import PeerRecord, PeerState
import layout
from layout import hub
from peer import metrics, placement, quant
from peer.adversary import Adversary, AdversarialRunner, PushTamper
from peer.blocks import DTYPES as DTYPE_OF, BlockRunner, load_config
from peer.config import PeerConfig
from peer.handler import PeerHandler
from peer.sessions import SessionTable

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"


def model_id_for(config_dict: dict, override: str | None) -> str:
    if override:
        records.model_key(override)  # validates
        return override
    return records.derive_model_id(config_dict)


def measure_throughput(runner: BlockRunner, steps: int = 4) -> float:
    """Single-token inference steps per second through the whole span (batch 1)."""
    cache = runner.new_cache()
    hidden = torch.zeros(1, 1, runner.hidden_size)
    runner.forward(hidden, torch.zeros(1, 1, dtype=torch.long), None, cache)  # warm-up
    began = time.perf_counter()
    for i in range(steps):
        runner.forward(hidden, torch.full((1, 1), i + 1, dtype=torch.long), None, cache)
    return steps / max(time.perf_counter() - began, 1e-9)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Peer:
    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg
        self._metrics = metrics.registry(  # read at each scrape
            self.statistics, lambda: [self.handler.phases.registry] if self.handler is not None else [])
        try:  # every check that can fail does so here, before the peer joins the swarm
            config = load_config(cfg.model_dir)
            self.device = quant.resolve_device(cfg.device)
            quant.check_backend(cfg.quant, self.device)
            quant.check_layers(config, cfg.quant, DTYPE_OF[cfg.dtype], self.device)
        except (hub.HubError, quant.QuantError, ValueError, layout.CheckpointError) as e:
            raise SystemExit(str(e)) from None
        self.num_model_blocks: int = config.num_hidden_layers
        self.model_type: str = config.model_type
        self.model_id = model_id_for(config.to_dict(), cfg.model_id)
        if cfg.end is not None and cfg.end > self.num_model_blocks:
            raise SystemExit(f"--blocks {cfg.start}:{cfg.end} is outside the model's {self.num_model_blocks} blocks")
        if cfg.num_blocks is not None and cfg.num_blocks > self.num_model_blocks:
            raise SystemExit(f"--num-blocks {cfg.num_blocks} is more than the model's {self.num_model_blocks} blocks")
        self.num_blocks = cfg.num_blocks  # None with --blocks; with neither option, as many as fit
        if (cfg.start is None and cfg.num_blocks is None) or cfg.max_memory is not None:
            self.num_blocks = self._size(config)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.identity = identity.load_or_create(cfg.identity_path)
        self.rng = random.Random()  # placement choices others cannot predict or copy
        self.start, self.end = cfg.start, cfg.end
        self.state = PeerState.JOINING
        self.throughput = 0.0
        self.runner: BlockRunner | None = None
        self.sessions = SessionTable(cfg.cache_tokens)
        self.handler: PeerHandler | None = None
        self.node: Node | None = None  # set by run(): the p2p daemon and the DHT process over it
        self.maddrs: list[str] = []
        self.relayed = False
        self.started_at = time.time()
        self.moves = 0

    def _size(self, config) -> int:
        """How many blocks this peer serves: --num-blocks or --blocks if given (checked against an
        explicit --max-memory), else as many as fit in --max-memory. Logs the arithmetic."""
        cfg = self.cfg
        # On the CPU, --max-memory is the whole process's RSS: what it holds already and its runtime count.
        on_cpu = self.device.type == "cpu"
        resident, overhead = (quant.process_rss(), quant.RUNTIME_OVERHEAD) if on_cpu else (0, 0)
        if cfg.max_memory is not None:
            budget, reason = cfg.max_memory, "--max-memory"
        else:
            budget, reason = quant.default_max_memory(self.device)
            budget += resident  # a share of what is free, on top of what this process holds
        try:
            fit = quant.blocks_that_fit(config, cfg.quant, DTYPE_OF[cfg.dtype], cfg.cache_tokens, budget, reason,
                                        resident=resident, overhead=overhead,
                                        kv_slack=quant.KV_SLACK if on_cpu else 1.0)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        _say(f"sizing: {fit.explanation}")
        wanted = cfg.num_blocks if cfg.num_blocks is not None else (cfg.end - cfg.start if cfg.start is not None else None)
        if wanted is None:
            _say(f"serving {fit.num_blocks} blocks (as many as fit)")
            return fit.num_blocks
        if wanted > fit.num_blocks:
            raise SystemExit(f"{wanted} blocks do not fit in --max-memory: {fit.explanation}. Serve fewer blocks, "
                             "raise --max-memory, or use --quant nf4")
        return wanted

    # ---- what the peer tells the swarm -------------------------------------------------------------

    def statistics(self) -> dict:
        runner = self.runner
        return {
            "peer_id": self.identity.peer_id, "model_id": self.model_id, "start": self.start, "end": self.end,
            "state": self.state.value, "dtype": self.cfg.dtype, "quant": self.cfg.quant,
            "device": str(self.device), "weight_bytes": runner.weight_bytes, "hidden_size": runner.hidden_size,
            "model_type": self.model_type,
            "throughput": self.throughput, "sessions": len(self.sessions),
            "cache_tokens_total": self.sessions.budget_tokens, "cache_tokens_left": self.sessions.tokens_left,
            "num_parameters": runner.num_parameters,
            "loaded_tensors": list(runner.loaded_tensor_names), "relayed": self.relayed, "moves": self.moves,
            "uptime": time.time() - self.started_at, "version": SOFTWARE_VERSION, **self.node.statistics(),
            **self.handler.counters(), **self.sessions.prefixes.statistics(),  # requests_served, errors, ...
            "phases": self.handler.phases.summary(),  # where its steps' time goes, ms (wire/phases.py)
        }

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 responder: GET /metrics gets the metrics, any other path a 404."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode(errors="replace").split("?", 1)[0] if len(parts) >= 2 else ""
            if path == metrics.PATH:
                body, content_type = metrics.exposition(self._metrics)
                status = b"200 OK"
            else:
                body, content_type, status = f"not found: metrics are at {metrics.PATH}\n".encode(), "text/plain", \
                    b"404 Not Found"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + content_type.encode()
                         + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sends no proper request gets nothing
        finally:
            writer.close()

    def record(self) -> PeerRecord:
        return PeerRecord(
            peer_id=self.identity.peer_id, model_id=self.model_id, start=self.start, end=self.end,
            state=self.state, throughput=self.throughput, dtype=self.cfg.dtype,
            cache_tokens_left=self.sessions.tokens_left, version=SOFTWARE_VERSION,
            public_name=self.cfg.public_name, maddrs=tuple(self.maddrs[: records.MAX_MADDRS]),
            relayed=self.relayed, num_sessions=len(self.sessions), model_blocks=self.num_model_blocks,
            model_type=self.model_type, num_parameters=self.runner.num_parameters if self.runner else 0,
            quant=self.cfg.quant, backward=self.cfg.backward,
        )

    async def announce(self, state: PeerState, timeout: float = 10.0) -> bool:
        """Store this peer's record; False if no DHT node accepted it within ``timeout`` seconds."""
        self.state = state
        try:
            return await asyncio.wait_for(
                directory.announce(self.node.dht, self.record(), ttl=2.5 * self.cfg.announce_period), timeout)
        except asyncio.TimeoutError:
            return False
        except directory.DHTDied as e:  # the node's watcher restarts it, then announces again (_rejoin)
            logger.warning("not announced: %s", e)
            return False

    async def _rejoin(self, daemon_replaced: bool) -> None:
        """The DHT process was restarted (dht.node.Node.watch): announce at once on the new one, so this
        peer's record never lapses. Its id, addresses, RPC handlers and open sessions did not change,
        unless the daemon died too and was replaced: then the handlers are registered on the new one
        and its addresses announced (sessions on the old daemon are lost; their clients fail over)."""
        if daemon_replaced:
            self.maddrs, self.relayed = await self._reachable_at()
            write_maddr_file(self.cfg.maddr_file, self.maddrs)
            if self.handler is not None:
                await self.handler.register(self.node.p2p)
            logger.warning("serving on a new p2p daemon at %s", self.maddrs)
        if self.start is None:
            return  # nothing announced yet: the first announcement comes once the blocks are chosen
        if await self.announce(self.state):
            logger.warning("re-announced this peer (%s, blocks [%s, %s)) on the restarted DHT",
                           self.state.value, self.start, self.end)
        else:
            logger.warning("the restarted DHT did not store this peer's record yet; the announce loop retries")

    async def _reachable_at(self) -> tuple[list[str], bool]:
        """(multiaddrs to announce, whether they are relay circuits only)."""
        direct = [] if self.cfg.no_listen else await self.node.visible_maddrs()
        if direct and not self.cfg.use_auto_relay:
            return direct, False
        relays = self.cfg.relay_maddrs or self.cfg.initial_peers
        circuits = [f"{r}/p2p-circuit" for r in relays]
        return (direct + circuits, False) if direct else (circuits, True)

    # ---- life cycle ---------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        finally:
            if self.handler is not None:
                self.handler.shutdown()

    async def _run(self) -> None:
        cfg = self.cfg
        self.node = await Node.start(
            self.identity, cfg.initial_peers, bootstrap_wait=cfg.bootstrap_wait, host=cfg.host, port=cfg.port, announce_maddrs=cfg.announce_maddrs,
            use_auto_relay=cfg.use_auto_relay, no_listen=cfg.no_listen)
        try:
            left = asyncio.Event()
            async with asyncio.TaskGroup() as tasks:  # the watcher restarts a dead DHT process until the peer left
                tasks.create_task(self.node.watch(self._rejoin, stop=left))
                try:
                    await self._serve()
                finally:
                    left.set()
        finally:
            await self.node.shutdown()

    async def _serve(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.maddrs, self.relayed = await self._reachable_at()
        if self.start is None:
            await asyncio.sleep(self.rng.uniform(0, cfg.placement_jitter))
            self.start = await self._choose_start()
            self.end = self.start + self.num_blocks
        # The shards come first: a peer that cannot fetch them never shows up in the swarm.
        try:
            await loop.run_in_executor(None, self._fetch, self.start, self.end)
        except hub.HubError as e:
            raise SystemExit(str(e)) from None
        await self.announce(PeerState.JOINING)  # others see these blocks taken while we load them
        _say(f"loading blocks [{self.start}, {self.end}) of {cfg.model_dir} ({self._format()} on {self.device})")
        self.runner, self.throughput = await loop.run_in_executor(None, self._load, self.start, self.end)
        _say(f"blocks [{self.start}, {self.end}) hold {quant.human(self.runner.weight_bytes)} of weights")
        self.handler = self._handler()
        await self.handler.register(self.node.p2p)  # on the daemon itself: a restarted DHT process keeps them
        deadline = time.monotonic() + 60
        while not await self.announce(PeerState.ONLINE):
            if time.monotonic() > deadline:
                raise RuntimeError("no DHT node accepted this peer's announcement within 60 s: check --initial-peers")
            await asyncio.sleep(0.5)
        metrics_server = None
        if cfg.metrics_port is not None:
            metrics_server = await asyncio.start_server(self._serve_metrics, cfg.host, cfg.metrics_port)
            _say(f"metrics at http://{cfg.host}:{metrics_server.sockets[0].getsockname()[1]}/metrics")
        write_maddr_file(cfg.maddr_file, self.maddrs)
        print(ready_line("peer", peer_id=self.identity.peer_id, model_id=self.model_id, maddrs=self.maddrs,
                         blocks=[self.start, self.end], relayed=self.relayed,
                         metrics_port=metrics_server.sockets[0].getsockname()[1] if metrics_server else None),
              flush=True)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with asyncio.TaskGroup() as tasks:  # both loops end when stop is set
            tasks.create_task(self._announce_loop(stop))
            if cfg.start is None and cfg.balance_period > 0:
                tasks.create_task(self._balance_loop(stop))
        # Leaving: no new sessions, tell the swarm, let open sessions finish (bounded), then go.
        self.handler.accepting = False
        await self.announce(PeerState.DRAINING, timeout=3.0)
        deadline = time.monotonic() + cfg.drain_timeout
        while len(self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.announce(PeerState.OFFLINE, timeout=3.0)
        if metrics_server is not None:
            metrics_server.close()
            await metrics_server.wait_closed()
        _say(f"peer {self.identity.peer_id} left the swarm")

    def _handler(self) -> PeerHandler:
        cfg = self.cfg
        return PeerHandler(
            self.runner, self.sessions, max_message_bytes=cfg.max_message_bytes, idle_timeout=cfg.idle_timeout,
            max_session_length=cfg.max_session_length, statistics=self.statistics, prefix_cache=cfg.prefix_cache,
            backward=cfg.backward, max_backward_tokens=cfg.max_backward_tokens,
            # TESTING AID: an equivocating adversary pushes the next peer other outputs than it answers
            tamper_push=PushTamper(Adversary.parse(cfg.adversary)) if cfg.adversary else None,
            sign=self.identity.sign, model_id=self.model_id,
        )

    def _format(self) -> str:
        return records.format_name(self.cfg.dtype, self.cfg.quant)

    def _fetch(self, start: int, end: int) -> str:
        """A local folder holding blocks [start, end): the model's own, or (hub id) their shards fetched."""
        return layout.part_source(self.cfg.model_dir, range(start, end), keep_outside=False)

    def _load(self, start: int, end: int) -> tuple[BlockRunner, float]:
        source = self._fetch(start, end)
        runner = BlockRunner(source, start, end, dtype=self.cfg.dtype, device=str(self.device), quant=self.cfg.quant)
        if self.cfg.adversary:
            _say(f"WARNING: this peer is an adversary ({self.cfg.adversary}): a testing aid that returns wrong results")
            runner = AdversarialRunner(runner, Adversary.parse(self.cfg.adversary), source)
        return runner, self.cfg.throughput if self.cfg.throughput is not None else measure_throughput(runner)

    async def _wait(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep ``seconds`` unless ``stop`` is set first; True if it was."""
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _announce_loop(self, stop: asyncio.Event) -> None:
        while not await self._wait(stop, self.cfg.announce_period):
            await self._ping_initial_peers()
            if not await self.announce(self.state):
                logger.warning("re-announcement was not stored by any DHT node")

    async def _ping_initial_peers(self, timeout: float = 10.0) -> None:
        """Remind the initial peers (bootstrap nodes) of this peer: one that restarted empty learns the swarm
        again from the peers' pings, and newcomers joining through it find their records."""
        try:
            await asyncio.wait_for(directory.rejoin(self.node.dht, self.cfg.initial_peers), timeout)
        except (asyncio.TimeoutError, directory.DHTDied) as e:
            logger.info("could not ping the initial peers: %s", e or "timed out")

    # ---- placement ------------------------------------------------------------------------------------

    async def _others(self) -> list[PeerRecord]:
        """The other peers of this model in this peer's format: a client routes through one format at a
        time (client.routing), so a format's coverage is what makes it usable, and placement fills it."""
        return [r for r in await directory.fetch_peers(self.node.dht, self.model_id)
                if r.peer_id != self.identity.peer_id and (r.dtype, r.quant) == (self.cfg.dtype, self.cfg.quant)]

    async def _choose_start(self) -> int:
        throughputs = placement.block_throughputs(await self._others(), self.num_model_blocks)
        start = placement.choose_start(throughputs, self.num_blocks, self.rng)
        _say(f"chose blocks [{start}, {start + self.num_blocks}) where the swarm is weakest")
        return start

    async def _balance_loop(self, stop: asyncio.Event) -> None:
        period = self.cfg.balance_period
        while not await self._wait(stop, self.rng.uniform(0.5 * period, 1.5 * period)):
            me = self.record()
            try:
                others = await self._others()
            except directory.DHTDied as e:  # the node's watcher restarts it; look again next period
                logger.warning("not rebalancing this period: %s", e)
                continue
            start = placement.should_move(others + [me], me, self.num_model_blocks,
                                          threshold=self.cfg.balance_threshold, rng=self.rng)
            if start is not None and not stop.is_set():
                await self._move(start)

    async def _move(self, start: int) -> None:
        """Fetch (hub id) and load the new blocks while still serving the old ones, then switch. Sessions already open stay
        on the old runner until they end; new sessions get the new blocks."""
        end = start + self.num_blocks
        _say(f"moving from [{self.start}, {self.end}) to [{start}, {end}) to strengthen the swarm")
        try:
            runner, throughput = await asyncio.get_running_loop().run_in_executor(None, self._load, start, end)
        except hub.HubError as e:
            _say(f"not moving: {e}")
            return
        self.handler.runner = runner
        self.runner, self.throughput = runner, throughput
        self.start, self.end = start, end
        self.moves += 1
        await self.announce(PeerState.ONLINE)


def main(cfg: PeerConfig) -> None:
    Peer(cfg).run()
