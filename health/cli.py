"""`swarmllm health --initial-peers ... [--host] [--port]`: serve the swarm health page."""

from __future__ import annotations

import argparse
import asyncio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    parser.add_argument("--refresh-period", type=float, default=10.0, help="seconds between snapshots")


def main(args: argparse.Namespace) -> None:

    from dht.node import Node
    from dht.ready import serve_http
    from health.app import make_app
    from health.monitor import Monitor

    async def serve() -> None:
        node = await Node.start(None, args.initial_peers, client_mode=True)
        try:
            monitor = Monitor(node, period=args.refresh_period)
            await monitor.start()
            async with asyncio.TaskGroup() as tasks:
                refresher = tasks.create_task(monitor.run())
                watcher = tasks.create_task(node.watch())  # restarts the DHT process if it dies
                await serve_http(make_app(monitor), args.host, args.port, "health")
                refresher.cancel()
                watcher.cancel()
        finally:
            await node.shutdown()

    asyncio.run(serve())
