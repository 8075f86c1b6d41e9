"""WAN emulation without netem: a TCP proxy on 127.0.0.1 that delays every byte by a one-way delay, in
each direction, with optional jitter, loss and bandwidth caps (a residential upload cap included).

Each direction of each connection is a delay queue: a chunk read at time t leaves at
``max(t, link free) + len / rate + delay``, in order, so the delay adds latency without serialising
throughput (many chunks are in flight at once, as on a long link). Jitter adds to each chunk a delay
drawn uniformly from [0, jitter]; a lost chunk (probability ``loss``) arrives one retransmission
timeout later (Linux's: the larger of 200 ms and two round trips); release times never decrease,
since TCP delivers in order (a late chunk holds back the ones behind it, as head-of-line blocking
does). ``upload_mbit`` caps only the target's direction (what a volunteer's peer sends). A peer listens on port A and
announces the proxy's port B (``--port A --announce-maddrs /ip4/127.0.0.1/tcp/B``), so everyone who
dials it goes through the proxy (../shared/notes/platform-facts.md §5).

In-process (its own thread and loop)::

    proxy = WanProxy(target_port=A, delay=0.025)
    port = proxy.start()  # B
    ...
    proxy.stop()

As a process (one proxy per --listen/--target pair; prints a SWARMLLM_READY line, stops on SIGTERM)::

    python -m bench.wanproxy --listen 9001 --target 8001 --delay-ms 25 [--rate-mbit 100]
        [--jitter-ms 25] [--loss 0.01] [--upload-mbit 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import signal
import threading

HOST = "127.0.0.1"  # the proxy only ever listens on and dials loopback
MIN_RTO = 0.2  # seconds: Linux's minimum TCP retransmission timeout
CHUNK = 64 * 1024  # bytes read at a time

logger = logging.getLogger(__name__)


class _Link:
    """One direction of one connection: read, stamp a release time, write at that time, in order."""

    def __init__(self, delay: float, rate: float | None, jitter: float = 0.0, loss: float = 0.0,
                 rng: random.Random | None = None):
        self.delay, self.rate = delay, rate  # seconds one way; bytes per second (None = unlimited)
        self.jitter, self.loss, self.rng = jitter, loss, rng or random.Random()
        self.free_at = 0.0  # loop time when the link has finished serialising what it was given
        self.last_release = 0.0  # TCP delivers in order: no chunk leaves before the one ahead of it

    def _extra(self) -> float:
        """Seconds this chunk waits beyond the fixed delay: jitter, and a retransmission if it is lost."""
        extra = self.rng.uniform(0.0, self.jitter) if self.jitter else 0.0
        if self.loss and self.rng.random() < self.loss:
            extra += max(MIN_RTO, 4 * self.delay)  # one RTO: the larger of 200 ms and two round trips
        return extra

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        arrived = asyncio.Event()

        async def read() -> None:
            while True:
                data = await reader.read(CHUNK)
                now = loop.time()
                if self.rate:
                    self.free_at = max(self.free_at, now) + len(data) / self.rate
                    release = self.free_at + self.delay
                else:
                    release = now + self.delay
                release = self.last_release = max(self.last_release, release + self._extra())
                queue.append((release, data))  # b"" = end of stream, delivered after the same delay
                arrived.set()
                if not data:
                    return

        async def write() -> None:
            while True:
                while not queue:
                    arrived.clear()
                    await arrived.wait()
                release, data = queue.popleft()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(read())
            tasks.create_task(write())


class WanProxy:
    """Listens on 127.0.0.1:``listen_port`` (0 = any free port) and forwards to 127.0.0.1:``target_port``
    with ``delay`` seconds one way in each direction and at most ``rate_mbit`` Mbit/s each way (None =
    unlimited). ``start()`` runs it on its own thread and returns the port it listens on."""

    def __init__(self, target_port: int, delay: float, *, listen_port: int = 0, rate_mbit: float | None = None,
                 jitter: float = 0.0, loss: float = 0.0, upload_mbit: float | None = None, seed: int | None = None):
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        for name, value in (("rate_mbit", rate_mbit), ("upload_mbit", upload_mbit)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for unlimited), got {value}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0 seconds, got {jitter}")
        if not 0 <= loss < 1:
            raise ValueError(f"loss must be a probability in [0, 1), got {loss}")
        self.target_port, self.delay, self.listen_port = target_port, delay, listen_port
        self.rate = rate_mbit * 1e6 / 8 if rate_mbit else None  # bytes per second
        caps = [c for c in (self.rate, upload_mbit * 1e6 / 8 if upload_mbit else None) if c]
        self.upload = min(caps) if caps else None  # bytes per second the target may send
        self.jitter, self.loss, self.rng = jitter, loss, random.Random(seed)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- asyncio side ----------------------------------------------------------------------------

    async def serve(self, ready=lambda port: None) -> None:
        """Run until ``stop()``; every connection is a task of this coroutine and ends with it."""
        self._stop = asyncio.Event()
        open_connections: set[asyncio.Task] = set()

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = tasks.create_task(self._connection(reader, writer))
            open_connections.add(task)
            task.add_done_callback(open_connections.discard)

        async with asyncio.TaskGroup() as tasks:
            server = await asyncio.start_server(accept, HOST, self.listen_port)
            self.port = server.sockets[0].getsockname()[1]
            ready(self.port)
            try:
                await self._stop.wait()
            finally:
                server.close()
                for task in list(open_connections):  # owned by this task group, cancelled here
                    task.cancel()

    def request_stop(self) -> None:
        """From the proxy's own loop: make ``serve()`` return."""
        if self._stop is not None:
            self._stop.set()

    def _link(self, rate: float | None) -> _Link:
        return _Link(self.delay, rate, self.jitter, self.loss, random.Random(self.rng.random()))

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError as e:
            logger.info("proxy :%s could not reach 127.0.0.1:%d (%s); dropping the connection",
                        self.port, self.target_port, e)
            client_w.close()
            return
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._link(self.rate).pump(client_r, target_w))
                tasks.create_task(self._link(self.upload).pump(target_r, client_w))  # what the target sends
        except* (ConnectionError, OSError):
            pass  # either side hung up or reset: the normal end of a proxied connection
        finally:
            client_w.close()
            target_w.close()

    # ---- thread side -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> int:
        """Start on a thread of its own; returns the port it listens on once it accepts connections."""
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.serve(lambda port: started.set()))
            except BaseException as e:  # surfaced by start() or stop()
                self._error = e
                started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name=f"wanproxy->{self.target_port}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"the proxy for 127.0.0.1:{self.target_port} did not start in {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"the proxy for 127.0.0.1:{self.target_port} failed to start: {self._error}") from self._error
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, and join the thread. Idempotent."""
        if self._thread is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.request_stop)
            except RuntimeError:  # the loop closed in between
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the proxy for 127.0.0.1:{self.target_port} did not stop in {timeout} s")
        self._thread = None
        if self._error is not None:
            raise RuntimeError(f"the proxy for 127.0.0.1:{self.target_port} failed: {self._error}") from self._error

    def __enter__(self) -> "WanProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _main(args: argparse.Namespace) -> None:
    from dht.ready import ready_line

    if len(args.listen) != len(args.target):
        raise SystemExit(f"give as many --listen ports as --target ports, got {args.listen} and {args.target}")
    proxies = [WanProxy(t, args.delay_ms / 1000, listen_port=b, rate_mbit=args.rate_mbit, jitter=args.jitter_ms / 1000,
                        loss=args.loss, upload_mbit=args.upload_mbit, seed=None if args.seed is None else args.seed + i)
               for i, (b, t) in enumerate(zip(args.listen, args.target))]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as tasks:
        ready = [asyncio.Event() for _ in proxies]
        for proxy, event in zip(proxies, ready):
            tasks.create_task(proxy.serve(lambda port, e=event: e.set()))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), timeout=10)
        print(ready_line("wanproxy", ports=[[p.port, p.target_port] for p in proxies], delay_ms=args.delay_ms,
                         rate_mbit=args.rate_mbit, jitter_ms=args.jitter_ms, loss=args.loss,
                         upload_mbit=args.upload_mbit), flush=True)
        await stop.wait()
        for proxy in proxies:
            proxy.request_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, nargs="+", required=True, metavar="PORT",
                        help="port(s) to listen on, 127.0.0.1 (0 = any free port)")
    parser.add_argument("--target", type=int, nargs="+", required=True, metavar="PORT",
                        help="port(s) on 127.0.0.1 to forward to, one per --listen port")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction, milliseconds")
    parser.add_argument("--rate-mbit", type=float, default=None, help="bandwidth cap per direction, Mbit/s")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="each chunk waits a further uniform [0, J] ms (order kept: head-of-line blocking)")
    parser.add_argument("--loss", type=float, default=0.0,
                        help="probability a chunk is lost and retransmitted one RTO later (max(200 ms, 2 RTT))")
    parser.add_argument("--upload-mbit", type=float, default=None,
                        help="cap on what the target sends (a volunteer's residential upload), Mbit/s")
    parser.add_argument("--seed", type=int, default=None, help="seed for jitter and loss")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
